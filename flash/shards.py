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
and is rebuilt when the shard's size or mtime, the caption key or the index version change. Indexing is the
one slow part (JPEGs are decoded at 1/8 scale, which still reads every byte): it runs once per data set, in
parallel over shards (`index_shards`: worker processes, and the ranks of a run each taking a share first).

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
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
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
    """Is --data a shard set: a .tar path or a brace pattern, or a folder holding .tar files?"""
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


def check_image(data):
    """(width, height) of an image that decodes to the end. A JPEG is decoded at 1/8 scale (PIL's draft mode:
    every byte is still entropy-decoded, so a truncated or corrupt file fails, at about a third of the cost)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        size = img.size
        img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        img.load()
    return size


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
                w, h = check_image(read(image))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
                    Image.DecompressionBombError) as e:
                skipped.append([key, f"bad image: {str(e)[:80]}"])
                continue
            samples.append([key, *image, h, w, caption])
    return samples, skipped


def index_places(path, caption_key, fallback_dir):
    """(stamp, [cache files, in order of preference]) of a shard's index: beside it, then in the run folder."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "caption_key": caption_key}
    places = [path.with_name(path.name + ".index.json")]
    if fallback_dir is not None:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        places.append(Path(fallback_dir) / "shard-index" / f"{path.stem}-{digest}.json")
    return stamp, places


def cached_index(path, caption_key="caption", fallback_dir=None):
    """The shard's cached index if one is still valid, else None."""
    stamp, places = index_places(path, caption_key, fallback_dir)
    for place in places:
        try:
            cached = json.loads(place.read_text())
            if cached.get("stamp") == stamp:
                return cached
        except (OSError, ValueError):
            pass
    return None


def index_shard(path, caption_key="caption", fallback_dir=None):
    """The shard's index, read from its cache file if still valid, else built and cached (beside the shard, or
    under `fallback_dir` if that folder is read-only)."""
    cached = cached_index(path, caption_key, fallback_dir)
    if cached is not None:
        return cached
    stamp, places = index_places(path, caption_key, fallback_dir)
    samples, skipped = scan(Path(path).resolve(), caption_key)
    index = {"stamp": stamp, "samples": samples, "skipped": skipped}
    for place in places:
        try:
            with atomic_path(place) as tmp:
                Path(tmp).write_text(json.dumps(index))
            break
        except OSError:
            continue        # read-only: try the next place (or use the index uncached)
    return index


def index_shards(paths, caption_key="caption", fallback_dir=None, processes=1, share=(0, 1)):
    """index_shard of every path. Shards without a valid cached index are indexed by `processes` processes in
    parallel (indexing decodes every image: the one slow part, once per data set). share = (rank, world): this
    rank indexes its own 1/world of them first, so N ranks starting together each index a share (and then find
    the rest cached) with no barrier to wait at; a shard another rank has not finished is indexed here too."""
    rank, world = share
    found = {}
    for group in (paths[rank::world], paths):
        todo = []
        for path in group:
            if path not in found:
                index = cached_index(path, caption_key, fallback_dir)
                todo += [path] if index is None else []
                found[path] = index
        if processes > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(processes, len(todo))) as pool:
                found.update(zip(todo, pool.map(index_shard, todo, repeat(caption_key), repeat(fallback_dir))))
        else:
            found.update((path, index_shard(path, caption_key, fallback_dir)) for path in todo)
    return [found[path] for path in paths]


class TarShards(torch.utils.data.Dataset):
    """The good samples of a list of shards, in shard and member order, as (image, caption, SizeInfo): the image
    a (3, h, w) tensor in [-1, 1] at the square `size`, or at its bucket's size when `buckets` are given."""

    def __init__(self, paths, size, caption_key="caption", buckets=None, cache_dir=None, processes=1, share=(0, 1)):
        self.paths, self.size, self.buckets = [Path(p) for p in paths], size, buckets
        self.items, self.skipped = [], []
        indices = index_shards(self.paths, caption_key, cache_dir, processes, share)
        for s, (path, index) in enumerate(zip(self.paths, indices)):
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
