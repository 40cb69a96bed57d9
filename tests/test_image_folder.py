"""ltroute.datasets.ImageFolder: torchvision's layout and attributes, read with Pillow."""

import doctest

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import ltroute.datasets._image_folder
from ltroute.datasets import ImageFolder


def write_folder(root, counts, size=(5, 4), mode="RGB", ext="png", seed=0):
    """``root/<class>/<i>.<ext>`` with random pixels; returns {path: uint8 array}."""
    rng = np.random.RandomState(seed)
    pixels = {}
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            array = rng.randint(0, 256, size=shape, dtype=np.uint8)
            path = root / name / f"{i}.{ext}"
            Image.fromarray(array).save(path)  # (H, W): "L", (H, W, 3): "RGB"
            pixels[str(path)] = array
    return pixels


def test_attributes_follow_torchvision(tmp_path):
    write_folder(tmp_path, {"zebra": 1, "ant": 3, "bee": 2})
    (tmp_path / "notes.txt").write_text("not a class")  # files in root are not classes
    (tmp_path / "bee" / "readme.md").write_text("not an image")
    data = ImageFolder(tmp_path)
    assert data.classes == ["ant", "bee", "zebra"]
    assert data.class_to_idx == {"ant": 0, "bee": 1, "zebra": 2}
    assert data.targets == [0, 0, 0, 1, 1, 2]
    assert len(data) == 6
    assert [label for _, label in data.samples] == data.targets
    assert data.samples[0][0] == str(tmp_path / "ant" / "0.png")


def test_items_are_float_tensors_in_unit_range_matching_the_pixels(tmp_path):
    pixels = write_folder(tmp_path, {"a": 2, "b": 1}, size=(5, 4))
    data = ImageFolder(tmp_path)
    for index, (path, label) in enumerate(data.samples):
        image, target = data[index]
        assert target == label and isinstance(target, int)
        assert image.dtype == torch.float32 and image.shape == (3, 4, 5)
        expected = torch.from_numpy(pixels[path]).permute(2, 0, 1).float() / 255
        assert_close(image, expected, rtol=0, atol=0)


def test_grayscale_mode_gives_one_channel(tmp_path):
    pixels = write_folder(tmp_path, {"a": 1, "b": 1}, mode="L")
    image, _ = ImageFolder(tmp_path, mode="L")[1]
    assert image.shape == (1, 4, 5)
    assert_close(image[0], torch.from_numpy(pixels[str(tmp_path / "b" / "0.png")]) / 255)
    assert ImageFolder(tmp_path)[0][0].shape == (3, 4, 5)  # RGB by default


def test_targets_need_no_decoding_and_transform_is_applied(tmp_path, monkeypatch):
    write_folder(tmp_path, {"a": 2, "b": 2}, ext="jpg")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    data = ImageFolder(tmp_path, transform=lambda x: x[:1] * 0 + 7)
    assert data.targets == [0, 0, 1, 1] and opened == []
    image, _ = data[3]
    assert len(opened) == 1
    assert image.shape == (1, 4, 5) and bool((image == 7).all())


def test_nested_files_and_upper_case_endings_are_found(tmp_path):
    write_folder(tmp_path / "a" / "deeper", {"x": 1})
    write_folder(tmp_path, {"b": 1}, ext="PNG")
    data = ImageFolder(tmp_path)
    assert data.classes == ["a", "b"] and data.targets == [0, 1]


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")


def test_root_without_class_folders(tmp_path):
    (tmp_path / "image.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folder"):
        ImageFolder(tmp_path)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "labels.csv").write_text("x")
    with pytest.raises(ValueError, match="no image file"):
        ImageFolder(tmp_path)


def test_unreadable_image_names_the_file(tmp_path):
    write_folder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "b" / "broken.jpg").write_bytes(b"this is not a jpeg")
    data = ImageFolder(tmp_path)
    assert len(data) == 3
    with pytest.raises(ValueError, match=r"cannot read the image file .*broken\.jpg"):
        data[2]  # b/0.png, b/broken.jpg: sorted by path


def test_same_samples_as_torchvision(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets", exc_type=ImportError)
    write_folder(tmp_path, {"dog": 2, "cat": 3})
    ours, theirs = ImageFolder(tmp_path), datasets.ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes and ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets


def test_docstring_example_runs():
    results = doctest.testmod(ltroute.datasets._image_folder, verbose=False)
    assert results.attempted > 0 and results.failed == 0
