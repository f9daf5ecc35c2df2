"""Teacher mode for Geometry Forcing: ``VGGT.aggregator_features`` returns the requested aggregator outputs
only, runs the blocks up to the deepest requested layer and no further, batches several clips, and runs
without autograd (inference mode, fp32 on CPU, autocast when asked)."""
import pytest
import torch

from geoforge.engine.models.vggt import VGGT, patch_token_grid


def tiny(**aggregator):
    agg = dict(img_size=28, patch_size=14, embed_dim=16, depth=6, num_heads=2, patch_embed="conv")
    agg.update(aggregator)
    return VGGT.from_config({"aggregator": agg, "camera_head": None, "depth_head": None, "point_head": None,
                             "track_head": None}).eval()


def count_block_calls(model):
    calls = {"frame": [], "global": []}
    handles = []
    for kind in calls:
        for i, block in enumerate(getattr(model.aggregator, f"{kind}_blocks")):
            handles.append(block.register_forward_hook(lambda *_, k=kind, j=i: calls[k].append(j)))
    return calls, handles


def test_features_equal_the_full_aggregator_outputs():
    model = tiny()
    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        full, start = model.aggregator(images)
    feats = model.aggregator_features(images, layers=[0, 3, -1])
    assert list(feats) == [0, 3, -1]  # keyed as requested, nothing else kept
    for layer in (0, 3, -1):
        assert torch.equal(feats[layer], full[layer])
        assert feats[layer].dtype == torch.float32
    grid = patch_token_grid(feats[3], start, model.patch_grid((28, 42)))
    assert grid.shape == (2, 3, 2, 3, 32)
    assert torch.equal(grid[:, :, 1, 2], full[3][:, :, start + 1 * 3 + 2])  # row-major patches


def test_stops_after_the_deepest_requested_layer():
    model = tiny()
    calls, handles = count_block_calls(model)
    model.aggregator_features(torch.rand(1, 2, 3, 28, 28), layers=[2, 1])
    assert calls == {"frame": [0, 1, 2], "global": [0, 1, 2]}
    calls["frame"].clear(), calls["global"].clear()
    model.aggregator_features(torch.rand(1, 2, 3, 28, 28), layers=[-6])  # == layer 0
    assert calls == {"frame": [0], "global": [0]}
    for h in handles:
        h.remove()


def test_block_groups_are_completed():
    # aa_block_size 2: frame blocks 2k, 2k+1 run before global blocks 2k, 2k+1, so layer 2 needs group 1.
    model = tiny(aa_block_size=2)
    calls, handles = count_block_calls(model)
    images = torch.rand(1, 2, 3, 28, 28)
    feats = model.aggregator_features(images, layers=[2])
    assert calls == {"frame": [0, 1, 2, 3], "global": [0, 1, 2, 3]}
    for h in handles:
        h.remove()
    with torch.no_grad():
        full, _ = model.aggregator(images)
    assert torch.equal(feats[2], full[2])


def test_several_clips_as_one_batch_equal_clip_by_clip():
    model = tiny()
    clips = torch.rand(3, 4, 3, 28, 28)
    batched = model.aggregator_features(clips, layers=[1, 5])
    for b in range(clips.shape[0]):
        single = model.aggregator_features(clips[b], layers=[1, 5])  # a 4-D input is one clip
        for layer in (1, 5):
            torch.testing.assert_close(batched[layer][b:b + 1], single[layer], rtol=1e-5, atol=1e-6)


def test_no_autograd_state_and_train_mode():
    model = tiny()
    images = torch.rand(1, 2, 3, 28, 28)
    feats = model.aggregator_features(images, layers=[1])
    assert feats[1].is_inference() and not feats[1].requires_grad
    plain = model.aggregator_features(images, layers=[1], inference=False)
    assert not plain[1].is_inference() and plain[1].grad_fn is None
    assert torch.equal(plain[1], feats[1])
    model.train()  # no dropout in VGGT, and no checkpointing without autograd: same numbers
    assert torch.equal(model.aggregator_features(images, layers=[1])[1], feats[1])


def test_bf16_autocast_on_request():
    model = tiny()
    images = torch.rand(1, 2, 3, 28, 28)
    ref = model.aggregator_features(images, layers=[5])[5]
    low = model.aggregator_features(images, layers=[5], dtype=torch.bfloat16)[5]
    assert low.dtype == torch.float32  # the residual stream stays float32 under autocast
    assert not torch.equal(low, ref)
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)


def test_layer_errors():
    model = tiny()
    images = torch.rand(1, 1, 3, 28, 28)
    with pytest.raises(ValueError, match="out of range"):
        model.aggregator_features(images, layers=[6])
    with pytest.raises(ValueError, match="at least one"):
        model.aggregator_features(images, layers=[])
