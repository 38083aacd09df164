"""Benchmark: how fast the training data loads, from tar shards and from an image folder, at 1, 2 and 4
DataLoader workers, and at what Flash step time the loader would become the bottleneck.

    python bench/data.py [--n 2000] [--resolution 512] [--batch-size 4] [--workers 1 2 4] [--buckets]

It writes --n synthetic photo-like JPEGs (smooth random colour fields with grain, sides drawn from 384 to 1024
px, aspect ratios 1:2 to 2:1, a caption each) to a temporary folder, and the same samples as webdataset
shards of 500. Then for each source and worker count it reads the whole stream of one rank once through
flash.data.Stream, exactly as train.py does (decode, crop, resize to --resolution, batch of --batch-size),
and prints samples per second (after the first batch). The shards' member index is built once first (timed
apart: it decodes every image, once per data set). The files are fresh, so both sources read from the page
cache: this measures decoding and resizing, the part that costs CPU on a training node, not the disk.

A Flash step at batch b per rank consumes b samples; the loader keeps up as long as one step takes longer
than b / (samples per second): that time is printed per row. Not a test: run it alone, on an idle machine.
"""
import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flash.buckets import bucket_set  # noqa: E402
from flash.data import Stream, stream_length, training_set  # noqa: E402


def write_images(folder, n, seed=0):
    """n JPEGs (quality 90) of random sizes and aspect ratios, with .txt captions: a 12 x 12 random colour field
    upsampled (smooth, compresses like a photo) plus a little grain."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        w, h = (int(v) for v in rng.integers(384, 1025, 2))
        field = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 6, (h, w, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:07d}.jpg", quality=90)
        (folder / f"{k:07d}.txt").write_text(f"a synthetic photo number {k}, {w} by {h}")


def write_shards(folder, out, per_shard=500):
    files = sorted(folder.glob("*.jpg"))
    for s in range(0, len(files), per_shard):
        with tarfile.open(out / f"{s // per_shard:06d}.tar", "w") as tar:
            for f in files[s:s + per_shard]:
                tar.add(f, arcname=f.name)
                tar.add(f.with_suffix(".txt"), arcname=f.with_suffix(".txt").name)


def rate(dataset, args, workers):
    """Samples per second reading one epoch of the stream in batches of --batch-size with `workers` processes,
    timed from the first batch on (the workers' start-up, once per run, left out)."""
    b = args.batch_size
    starts = list(range(0, stream_length(dataset) // b * b, b))
    stream = Stream(dataset, 0, args.resolution, starts, b, workers)
    stream.batch(range(0, b))
    t = time.perf_counter()
    for s in starts[1:]:
        stream.batch(range(s, s + b))
    return (len(starts) - 1) * b / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="images (the stream reads each once)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="per rank, as train.py's")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--buckets", action="store_true", help="shards with SDXL's aspect-ratio buckets (scaled)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        folder.mkdir()
        shards.mkdir()
        t = time.perf_counter()
        write_images(folder, args.n)
        write_shards(folder, shards)
        print(f"wrote {args.n} JPEGs and {len(list(shards.glob('*.tar')))} shards in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        buckets = bucket_set("sdxl", args.resolution, 8) if args.buckets else None
        sources = {"shards": training_set(str(shards), args.resolution, buckets=buckets, batch_size=args.batch_size)}
        print(f"shard index built in {time.perf_counter() - t:.1f} s (once per data set; cached beside the shards)")
        sources["folder"] = training_set(str(folder), args.resolution)
        print(f"\n{'source':8} {'workers':>7} {'samples/s':>10}  loader-bound below a step time of "
              f"(batch {args.batch_size} per rank)")
        for name, dataset in sources.items():
            for w in args.workers:
                r = rate(dataset, args, w)
                print(f"{name:8} {w:>7} {r:>10.1f}  {args.batch_size / r:.3f} s")


if __name__ == "__main__":
    main()
