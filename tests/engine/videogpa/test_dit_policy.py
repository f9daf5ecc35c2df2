"""The own-DiT policy: seeded image-to-video sampling (first frame kept), guidance, the training terms, and
loading weights from an engine/train.py checkpoint directory."""
import pytest
import torch
from safetensors.torch import save_file

from geoforge.engine.config import load_recipe
from geoforge.engine.objectives.dpo import per_sample_error
from geoforge.engine.videogpa.policy import Condition, build_dit_policy, load_dit_weights

T, R = 4, 32


def recipe(*overrides):
    return load_recipe("videogpa_tiny", [f"data.frames={T}", *overrides])


def condition(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.tensor([[28.0, 0, 15.5], [0, 28.0, 15.5], [0, 0, 1]]).expand(T, 3, 3)
    ext = torch.eye(3, 4).expand(T, 3, 4).clone()
    ext[:, 2, 3] = -torch.linspace(0, 0.5, T)
    return Condition(key="0", first_frame=torch.rand(3, R, R, generator=g), intrinsics=k, extrinsics=ext)


def test_seeded_samples_keep_the_first_frame():
    policy = build_dit_policy(recipe())
    cond = condition()
    videos = policy.sample(cond, seeds=[3, 4, 3], steps=3, guidance=1.0)
    assert videos.shape == (3, T, R, R, 3) and videos.dtype.name == "uint8"
    assert (videos[0] == videos[2]).all() and (videos[0] != videos[1]).any()
    first = (cond.first_frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert all((v[0] == first).all() for v in videos)
    alone = policy.sample(cond, seeds=[4], steps=3, guidance=1.0)   # the K candidates are sampled in one batch:
    diff = (alone[0].astype(int) - videos[1].astype(int))            # each is the sample its seed gives alone
    assert abs(diff).max() <= 1 and (diff != 0).mean() < 0.01        # (up to the rounding of batched products)
    guided = policy.sample(cond, seeds=[3], steps=3, guidance=3.0)
    assert (guided[0] != videos[0]).any()   # camera guidance changes the sample


def test_training_terms():
    policy = build_dit_policy(recipe())
    frames = torch.rand(2, T, 3, R, R)
    x0 = policy.encode(frames)
    torch.testing.assert_close(x0, frames * 2 - 1)
    noise = policy.draw_noise(tuple(x0.shape), torch.Generator().manual_seed(1))
    assert (noise["t"][:, 0] == 0).all() and ((noise["t"][:, 1:] > 0) & (noise["t"][:, 1:] < 1)).all()
    tt = noise["t"][:, :, None, None, None]
    torch.testing.assert_close(policy.add_noise(x0, noise), (1 - tt) * x0 + tt * noise["eps"])
    torch.testing.assert_close(policy.target(x0, noise), noise["eps"] - x0)
    cond = policy.batch_condition([condition(0), condition(1)])
    err = policy.per_sample_error(policy.network, x0, cond, noise)
    with torch.no_grad():
        pred = policy.predict(policy.network, policy.add_noise(x0, noise), noise, cond)
    torch.testing.assert_close(err.detach(), ((pred - policy.target(x0, noise)) ** 2)[:, 1:].mean(dim=(1, 2, 3, 4)))
    mask = policy.loss_mask(x0, noise)
    assert mask[:, 0].logical_not().all() and mask[:, 1:].all()
    torch.testing.assert_close(err.detach(), per_sample_error(pred, policy.target(x0, noise), mask))


def test_checkpoint_weights(tmp_path):
    source = build_dit_policy(recipe("seed=5"))
    state = {f"dit.{k}": v for k, v in source.network.state_dict().items()}
    ckpt = tmp_path / "step_300"
    ckpt.mkdir()
    save_file(state, str(ckpt / "model.safetensors"))
    ema = {k: v + 1.0 for k, v in state.items()}
    save_file(ema, str(ckpt / "ema.safetensors"))
    target = build_dit_policy(recipe()).network
    assert load_dit_weights(target, ckpt, use_ema=False).endswith("model.safetensors")
    for k, v in source.network.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v)
    assert load_dit_weights(target, ckpt, use_ema=True).endswith("ema.safetensors")
    policy = build_dit_policy(recipe(f"videogpa.policy.checkpoint={ckpt}"))
    torch.testing.assert_close(policy.network.state_dict()["final.linear.bias"], ema["dit.final.linear.bias"])
    misfit = r"videogpa\.policy\.checkpoint .* do not fit the recipe's model section: unexpected keys: blocks\.3"
    with pytest.raises(ValueError, match=misfit):
        load_dit_weights(build_dit_policy(recipe("model.depth=3")).network, ckpt)
    with pytest.raises(FileNotFoundError, match="videogpa.policy.checkpoint"):
        load_dit_weights(target, tmp_path / "missing")
