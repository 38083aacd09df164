import json

import numpy as np
import pytest
import torch
from PIL import Image

from flash.data import DIGITS_FILE, ImageCaptionFolder, Digits, caption_for, center_crop_resize


def _png(path, w, h, color):
    Image.fromarray(np.full((h, w, 3), color, dtype=np.uint8)).save(path)


def test_center_crop_resize_range_and_crop():
    img = Image.fromarray(np.concatenate([np.zeros((20, 10, 3)), np.full((20, 20, 3), 255), np.zeros((20, 10, 3))],
                                         axis=1).astype(np.uint8))  # 40 wide, white centre square
    x = center_crop_resize(img, 8)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.ones_like(x))  # only the white centre survives the crop


def test_folder_with_txt_captions(tmp_path):
    _png(tmp_path / "a.png", 16, 12, 0)
    _png(tmp_path / "b.jpg", 12, 16, 255)
    (tmp_path / "a.txt").write_text("a black square\n")
    ds = ImageCaptionFolder(tmp_path, size=8)
    assert len(ds) == 2
    x, text = ds[0]
    assert text == "a black square" and x.shape == (3, 8, 8) and x.max() == -1
    assert ds[1][1] == ""  # no caption file: empty caption


def test_folder_with_jsonl(tmp_path):
    _png(tmp_path / "x.png", 8, 8, 128)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "x.png", "text": "grey"}) + "\n")
    assert ImageCaptionFolder(tmp_path, size=4)[0][1] == "grey"


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="no such data folder"):
        ImageCaptionFolder(tmp_path / "missing")


def test_captions():
    assert caption_for(7) == "a handwritten digit seven"
    import random
    texts = [caption_for(3, random.Random(i)) for i in range(400)]
    empty = sum(t == "" for t in texts) / len(texts)
    assert 0.05 < empty < 0.15
    assert all(("3" in t or "three" in t) for t in texts if t)


@pytest.mark.skipif(not DIGITS_FILE.is_file(), reason="run `python -m flash.data fetch` (the README test command does)")
def test_digits_split():
    train, test = Digits("train"), Digits("test")
    assert len(train) == 4500 and len(test) == 500
    assert torch.bincount(test.labels).tolist() == [50] * 10
    assert train.images.shape == (4500, 3, 32, 32) and -1 <= train.images.min() and train.images.max() <= 1
    # The held-out images are not in the training split.
    flat = train.images[:, 0].flatten(1)
    for i in range(0, 500, 25):
        same_class = flat[train.labels == int(test.labels[i])]
        assert not (same_class == test.images[i, 0].flatten()).all(dim=1).any()
    assert (flat == train.images[17, 0].flatten()).all(dim=1).any()  # the check itself can find a match
    x, text = test[123]
    assert text == caption_for(int(test.labels[123]))
