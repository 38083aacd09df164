"""Training data in webdataset-style tar shards, read at random by a cached index of their members.

A shard is an uncompressed tar file whose members are grouped into samples by key: the member's path up to the
first dot of its file name (`000123.jpg`, `000123.txt`, `000123.json` are sample `000123`), webdataset's
convention, the form in which LAION-, COYO- and DataComp-style sets are distributed. A sample has an image
(`jpg`, `jpeg`, `png`, `webp`) and a caption: its `txt` member, else the `caption_key` field of its `json` (a
sample with neither is captioned "", as an image without a .txt in a folder is). `shard_paths` reads the --data
forms: one `.tar` file, a brace pattern (`data/{000000..000123}.tar`, also `{a,b}`), or a folder of `.tar` files.

Why an index instead of streaming each shard from its start (webdataset's way): the sample stream of a run is
a function of (seed, rank, position) (flash/data.py), so any position must be readable without replaying the
ones before it. `index_shard` walks a shard's headers once, decodes every image and caption, and writes one
JSON file: for each good sample the offset and size of its image bytes, its original size (for the buckets
and SDXL's size conditioning) and its caption; and the samples it skipped, with why. Reading a sample is then
one seek and one read of its image; --resume, or N ranks each taking their own positions, re-reads nothing.
The index lives beside the shard (`NAME.tar.index.json`) if that folder is writable, else in the run folder,
and is rebuilt when the shard's size or mtime, the caption key or the index version change.

Bad samples (a corrupt or undecodable image, a caption that is not UTF-8 or not valid JSON, a truncated shard)
are decided while indexing, so the decision is the same on every rank and every resume: they are left out of
the stream and counted (`TarShards.skipped`; train.py logs the count and warns once).
"""
import hashlib
import io
import json
import re
import tarfile
import warnings
from pathlib import Path

import torch
from PIL import Image

from flash.buckets import fit, nearest_bucket, size_info
from flash.io import atomic_path

INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern):
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (zero padding kept); '{x,y}' alternatives."""
    m = BRACES.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
            raise ValueError(f"{pattern}: a brace range needs {{FIRST..LAST}} with FIRST <= LAST, digits only")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in expand_braces(pattern[:m.start()] + c + pattern[m.end():])]


def is_shard_spec(data):
    """Is --data a shard set: a .tar path or pattern, or a folder holding .tar files (and no images)?"""
    if data.endswith((".tar", ".tar.gz", ".tgz")) or BRACES.search(data):
        return True
    folder = Path(data)
    return folder.is_dir() and any(p.suffix == ".tar" for p in folder.iterdir())


def shard_paths(data):
    """The shard files of --data, in order; a one-line ValueError if one is missing."""
    folder = Path(data)
    paths = sorted(folder.glob("*.tar")) if folder.is_dir() else [Path(p) for p in expand_braces(data)]
    if not paths:
        raise ValueError(f"{data}: no .tar shards found")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: no such shard")
        if p.suffix != ".tar":
            raise ValueError(f"{p}: shards must be uncompressed .tar files (read at random by offset)")
    return paths


def caption_of(ext, data, caption_key):
    """A caption member's text; ValueError when it is not UTF-8, not JSON, or lacks the key."""
    text = data.decode("utf-8")
    if ext == "txt":
        return text.strip()
    value = json.loads(text).get(caption_key)
    if not isinstance(value, str):
        raise ValueError(f"no string {caption_key!r} in its json")
    return value.strip()


def read_image(data):
    """Decode fully (a truncated file fails here, not in the middle of a run); -> RGB PIL image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    return img.convert("RGB")


def scan(path, caption_key):
    """Walk a shard once: -> (samples [[key, offset, size, height, width, caption]], skipped [[key, why]])."""
    groups, skipped = {}, []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                if member.isfile() and ext.lower() in IMAGE_EXTS + ("txt", "json"):
                    key = f"{folder}/{stem}" if folder else stem
                    groups.setdefault(key, {}).setdefault(ext.lower(), (member.offset_data, member.size))
    except tarfile.ReadError as e:
        if not groups:
            raise ValueError(f"{path}: not a readable tar file ({e})") from None
        skipped.append(["(end of shard)", f"truncated after {len(groups)} samples: {e}"])  # keep what was read
    samples = []
    with open(path, "rb") as f:
        def read(offset_size):
            f.seek(offset_size[0])
            data = f.read(offset_size[1])
            if len(data) != offset_size[1]:
                raise ValueError("member data cut short")
            return data
        for key, exts in groups.items():
            image = next((exts[e] for e in IMAGE_EXTS if e in exts), None)
            if image is None:
                skipped.append([key, "no image member"])
                continue
            try:
                text = next(((e, read(exts[e])) for e in ("txt", "json") if e in exts), None)
                caption = "" if text is None else caption_of(*text, caption_key)
            except ValueError as e:       # UnicodeDecodeError and JSONDecodeError are ValueErrors
                skipped.append([key, f"bad caption: {str(e)[:80]}"])
                continue
            try:
                w, h = read_image(read(image)).size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                skipped.append([key, f"bad image: {str(e)[:80]}"])
                continue
            samples.append([key, *image, h, w, caption])
    return samples, skipped


def index_shard(path, caption_key="caption", fallback_dir=None):
    """The shard's index, read from its cache file if still valid, else built and cached (beside the shard, or
    under `fallback_dir` if that folder is read-only)."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "caption_key": caption_key}
    places = [path.with_name(path.name + ".index.json")]
    if fallback_dir is not None:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        places.append(Path(fallback_dir) / "shard-index" / f"{path.stem}-{digest}.json")
    for place in places:
        try:
            cached = json.loads(place.read_text())
            if cached.get("stamp") == stamp:
                return cached
        except (OSError, ValueError):
            pass
    samples, skipped = scan(path, caption_key)
    index = {"stamp": stamp, "samples": samples, "skipped": skipped}
    for place in places:
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(place) as tmp:
                Path(tmp).write_text(json.dumps(index))
            break
        except OSError:
            continue        # read-only: try the next place (or use the index uncached)
    return index


class TarShards(torch.utils.data.Dataset):
    """The good samples of a list of shards, in shard and member order, as (image, caption, SizeInfo): the image
    a (3, h, w) tensor in [-1, 1] at the square `size`, or at its bucket's size when `buckets` are given."""

    def __init__(self, paths, size, caption_key="caption", buckets=None, cache_dir=None):
        self.paths, self.size, self.buckets = [Path(p) for p in paths], size, buckets
        self.items, self.skipped = [], []
        for s, path in enumerate(self.paths):
            index = index_shard(path, caption_key, cache_dir)
            self.items += [(s, *sample[1:]) for sample in index["samples"]]
            self.skipped += [(path.name, *bad) for bad in index["skipped"]]
        if not self.items:
            raise ValueError(f"{self.paths[0].parent}: no readable samples in {len(self.paths)} shard(s)")
        # Each sample's bucket, from its stored size: fixed for the run, so the epochs can be planned ahead.
        self.bucket_of = [nearest_bucket(h, w, buckets) for _, _, _, h, w, _ in self.items] if buckets else None

    def __len__(self):
        return len(self.items)

    def target(self, i):
        if self.buckets is None:
            return (self.size, self.size), None
        bucket = self.buckets[self.bucket_of[i]]
        return bucket.size, bucket.ratio

    def __getitem__(self, i):
        return self.load(i, *self.target(i))

    def load(self, i, target, ratio=None):
        """Sample i fitted to target (h, w); ratio: PixArt's aspect-ratio condition (default h / w)."""
        s, offset, size, h, w, caption = self.items[i]
        with open(self.paths[s], "rb") as f:
            f.seek(offset)
            image = read_image(f.read(size))
        return fit(image, target), caption, size_info(h, w, target, ratio)
