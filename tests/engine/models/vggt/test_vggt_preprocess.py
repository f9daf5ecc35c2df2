"""VGGT preprocessing against the rules of the official ``vggt/utils/load_fn.py::load_and_preprocess_images``
(crop / pad modes, width 518, sizes multiples of 14, white padding, RGBA on white), plus the teacher's
resize helpers."""
import numpy as np
import pytest
import torch

from geoforge.engine.models.vggt import load_and_preprocess_images, preprocess_images, resize_for_vggt, vggt_size

Image = pytest.importorskip("PIL.Image")


def official_rules(paths, mode="crop"):
    """The official function, step by step (torchvision's ToTensor written with numpy)."""
    images, shapes, target = [], set(), 518
    for path in paths:
        img = Image.open(path)
        if img.mode == "RGBA":
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        img = img.convert("RGB")
        width, height = img.size
        if mode == "pad":
            if width >= height:
                new_width, new_height = target, round(height * (target / width) / 14) * 14
            else:
                new_height, new_width = target, round(width * (target / height) / 14) * 14
        else:
            new_width, new_height = target, round(height * (target / width) / 14) * 14
        img = img.resize((new_width, new_height), Image.Resampling.BICUBIC)
        img = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if mode == "crop" and new_height > target:
            start_y = (new_height - target) // 2
            img = img[:, start_y:start_y + target, :]
        if mode == "pad":
            hp, wp = target - img.shape[1], target - img.shape[2]
            if hp > 0 or wp > 0:
                img = torch.nn.functional.pad(img, (wp // 2, wp - wp // 2, hp // 2, hp - hp // 2), value=1.0)
        shapes.add((img.shape[1], img.shape[2]))
        images.append(img)
    if len(shapes) > 1:
        mh, mw = max(s[0] for s in shapes), max(s[1] for s in shapes)
        padded = []
        for img in images:
            hp, wp = mh - img.shape[1], mw - img.shape[2]
            if hp > 0 or wp > 0:
                img = torch.nn.functional.pad(img, (wp // 2, wp - wp // 2, hp // 2, hp - hp // 2), value=1.0)
            padded.append(img)
        images = padded
    return torch.stack(images)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vggt_images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (w, h) in {"landscape": (640, 480), "portrait": (300, 700), "wide": (1000, 200),
                         "square": (64, 64)}.items():
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        paths[name] = root / f"{name}.png"
        Image.fromarray(arr).save(paths[name])
    rgba = rng.integers(0, 256, size=(50, 90, 4), dtype=np.uint8)
    rgba[:, :45, 3] = 0  # left half fully transparent -> white
    paths["rgba"] = root / "rgba.png"
    Image.fromarray(rgba).save(paths["rgba"])
    return paths


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("names", [["landscape"], ["portrait"], ["wide"], ["rgba"], ["square", "landscape"],
                                   ["landscape", "portrait", "wide"]])
def test_matches_the_official_rules(image_files, mode, names):
    paths = [image_files[n] for n in names]
    ours = load_and_preprocess_images(paths, mode=mode)
    ref = official_rules(paths, mode=mode)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert ours.shape[-2] % 14 == 0 and ours.shape[-1] % 14 == 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_shapes_of_the_two_modes(image_files):
    landscape, portrait = image_files["landscape"], image_files["portrait"]
    assert load_and_preprocess_images([landscape]).shape == (1, 3, 392, 518)  # 480 * 518 / 640 = 388.5 -> 392
    assert load_and_preprocess_images([portrait]).shape == (1, 3, 518, 518)  # 1209 tall, centre-cropped
    assert load_and_preprocess_images([portrait], mode="pad").shape == (1, 3, 518, 518)
    padded = load_and_preprocess_images([portrait], mode="pad")[0]
    assert bool((padded[:, :, :10] == 1.0).all()) and bool((padded[:, :, -10:] == 1.0).all())  # white sides
    rgba = load_and_preprocess_images([image_files["rgba"]])[0]
    assert bool((rgba[:, 20:-20, :200] == 1.0).all())  # transparent -> white


def test_tensor_inputs_follow_the_same_rules(image_files):
    img = Image.open(image_files["landscape"]).convert("RGB")
    as_tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # uint8 [3, H, W]
    ours = preprocess_images([as_tensor], mode="crop")
    ref = preprocess_images([img], mode="crop")
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.02  # torch bicubic (antialiased) vs PIL bicubic
    with pytest.raises(ValueError, match="mode"):
        preprocess_images([as_tensor], mode="stretch")
    with pytest.raises(ValueError, match="at least 1"):
        preprocess_images([])
    with pytest.raises(FileNotFoundError):
        load_and_preprocess_images([image_files["landscape"].parent / "missing.png"])


def test_teacher_resize_helpers():
    assert vggt_size(256, 256) == (518, 518)
    assert vggt_size(256, 448, target_width=224) == (126, 224)
    with pytest.raises(ValueError, match="multiple of 14"):
        vggt_size(256, 256, target_width=500)
    frames = torch.rand(2, 5, 3, 64, 96)
    out = resize_for_vggt(frames, (56, 84))
    assert out.shape == (2, 5, 3, 56, 84) and bool(((out >= 0) & (out <= 1)).all())
    torch.testing.assert_close(resize_for_vggt(out, (56, 84)), out)  # already the right size: unchanged
    with pytest.raises(ValueError, match="multiples of 14"):
        resize_for_vggt(frames, (50, 84))
