"""The COCO evaluation of a text-to-image pipeline (`eval.py --coco` is its command line): FID against the COCO
reference images and CLIP score, the two numbers of the paper's tables, sharded over ranks and resumable.

Protocol (fixed, so a rerun, or a run on another number of GPUs, reproduces the numbers):
- Subset: one caption per image id, the annotation with the smallest annotation id. The image ids are
  sorted, shuffled by a torch.Generator seeded with SUBSET_SEED (not --seed: the images drawn never change
  between runs or settings), and the first n kept. Image i of the evaluation is entry i of that list.
- Generation: image i is prompted with its caption and seeded with flash.evaluate.image_seed(seed, i), the
  digits evaluation's per-image generators. Images are generated in fixed blocks of --batch consecutive
  indices, block b on rank b % world (see generate_images), so the bytes of an image depend on --batch (a
  batched pass rounds differently) but not on the rank count nor on resuming. Each image is written as `{i:06d}.png` through a temporary file
  and os.replace, so a killed run leaves only whole PNGs; a rerun skips every image that opens as a PNG of
  the pipeline's size and generates the others.
- FID resize protocol: every image, reference and generated, is read from disk as 8-bit RGB; a reference
  image is centre-cropped to the square of its shorter side (the generated images are square; no aspect
  distortion); then both are resized to 299x299 with PIL's bicubic filter on the 8-bit image (clean-fid's
  choice of filter, applied to uint8 as PIL does it, rather than pytorch-fid's bilinear tensor resize) and
  fed to flash.metrics' TF-FID Inception, which then needs no resize of its own. The reference set is the
  n images of the subset, so n sets both sample sizes (FID is biased upward at small n: compare equal n).
- CLIP score: flash.clip_vision.clip_score, the mean cosine of the image and caption embeddings, unscaled
  (0.306, not torchmetrics' 100 * max(cos, 0)); images go through CLIP's own preprocessing from the PNGs,
  captions through the CLIP tokenizer, truncated to its 77 tokens.
- Cache: the Inception and CLIP features of a file list are stored in OUT/.features/ under a SHA-1 of the
  network's name and the files' names and contents (a regenerated or replaced image changes the key), so a
  rerun that changes nothing reads them back instead of recomputing.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from flash.clip_vision import clip_score, preprocess
from flash.evaluate import image_seed
from flash.io import cached_features, read_json, to_uint8, write_png
from flash.metrics import fid_from_features, inception_features
from flash.pipeline import generate

SUBSET_SEED = 2024     # the caption subset's shuffle: part of the protocol, independent of --seed
FID_SIZE = 299
CACHE = ".features"


@dataclass
class Entry:
    index: int
    image_id: int
    file_name: str
    caption: str


# -- the caption subset ------------------------------------------------------------------------------

def read_captions(path):
    """A COCO captions annotation JSON -> {image_id: (file_name, caption)}, one caption per image (the
    annotation with the smallest id); images without a caption are dropped."""
    data = read_json(path, "COCO captions file", limit=1 << 28)
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        best = {}
        for a in data["annotations"]:
            if a["image_id"] in files and (a["image_id"] not in best or a["id"] < best[a["image_id"]][0]):
                best[a["image_id"]] = (a["id"], a["caption"].strip())
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return {i: (files[i], caption) for i, (_, caption) in best.items()}


def draw_subset(captions, n):
    """The first n image ids of a SUBSET_SEED shuffle of the sorted ids -> [Entry] (see the protocol)."""
    if n > len(captions):
        raise ValueError(f"--n {n}: the captions file has only {len(captions)} captioned images")
    ids = sorted(captions)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n].tolist()
    return [Entry(i, ids[k], *captions[ids[k]]) for i, k in enumerate(order)]


# -- generation --------------------------------------------------------------------------------------

def image_path(out, i):
    return Path(out) / f"{i:06d}.png"


def is_done(path, size):
    """A whole PNG of size x size (decoded to the last byte: a truncated file fails)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.format == "PNG" and im.size == (size, size)
    except (OSError, ValueError, SyntaxError):
        return False


def generate_images(pipe, entries, out, steps, sampler, guidance, seed=0, batch=8, rank=0, world=1,
                    progress=True):
    """Write this rank's missing images -> the number written now.

    The unit of work is a block of `batch` consecutive indices (block b = images b*batch..(b+1)*batch-1),
    generated as one batch by rank b % world. A batched forward pass does not round exactly like a smaller
    one, so fixing the blocks is what makes the bytes independent of the rank count and of resuming: a block
    with any image missing is generated whole, and only its missing images are written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = pipe.default_size
    blocks = [entries[first:first + batch] for first in range(0, len(entries), batch)]
    todo = []
    for b, block in enumerate(blocks):
        missing = [e for e in block if not is_done(image_path(out, e.index), size)]
        if b % world == rank and missing:
            todo.append((block, {e.index for e in missing}))
    written = 0
    with tqdm(total=sum(len(m) for _, m in todo), desc=f"generate (rank {rank})", unit="img",
              disable=not progress) as bar:
        for block, missing in todo:
            gens = [torch.Generator("cpu").manual_seed(image_seed(seed, e.index)) for e in block]
            images = generate(pipe, [e.caption for e in block], steps=steps, sampler=sampler, guidance=guidance,
                              generator=gens, progress=False)
            for e, image in zip(block, images):
                if e.index in missing:
                    write_png(to_uint8(image), image_path(out, e.index))
            written += len(missing)
            bar.update(len(missing))
    return written


# -- features, cached --------------------------------------------------------------------------------

def files_key(name, paths):
    """SHA-1 of a network name and the files' names and bytes (in list order): the cache follows the content,
    so an image rewritten with the same size and time, or a folder copied elsewhere, is keyed right. Reading
    the files costs far less than running a network on them."""
    h = hashlib.sha1(name.encode())
    for p in paths:
        h.update(f"\0{Path(p).name}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cached(cache_dir, name, paths, compute):
    """compute(paths) -> (N, D) features, read from cache_dir when the key (files_key) matches."""
    key = files_key(name, paths)
    path = Path(cache_dir) / f"{name}_{key[:16]}.safetensors"
    return cached_features(path, key, lambda: compute(paths))


def read_rgb(path, square=False):
    """An image file -> uint8 (3, H, W) RGB tensor; square=True centre-crops it to its shorter side."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if square:
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        return im


def fid_input(path, square):
    """The FID resize protocol: 8-bit RGB, (square crop,) PIL bicubic to 299 -> (3, 299, 299) in [-1, 1]
    with values k / 127.5 - 1, which the Inception's own 8-bit quantisation maps back to k exactly."""
    im = read_rgb(path, square).resize((FID_SIZE, FID_SIZE), Image.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(FID_SIZE, FID_SIZE, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def fid_features(inception, paths, device, square=False, batch=50, desc="inception", progress=True):
    feats = []
    for first in tqdm(range(0, len(paths), batch), desc=desc, disable=not progress):
        x = torch.stack([fid_input(p, square) for p in paths[first:first + batch]]).to(device)
        feats.append(inception_features(inception, x, batch).cpu())
    return torch.cat(feats)


@torch.no_grad()
def clip_image_features(image_encoder, paths, device, batch=50, progress=True):
    feats = []
    size = image_encoder.config.image_size
    for first in tqdm(range(0, len(paths), batch), desc="clip images", disable=not progress):
        images = [torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
                  .permute(2, 0, 1) for im in (read_rgb(p) for p in paths[first:first + batch])]
        feats.append(image_encoder(preprocess(images, size).to(device)).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def clip_text_features(text_encoder, tokenizer, captions, device, batch=50, progress=True):
    feats = []
    for first in tqdm(range(0, len(captions), batch), desc="clip captions", disable=not progress):
        ids, _ = tokenizer(captions[first:first + batch])
        feats.append(text_encoder(ids.to(device)).pooled.float().cpu())
    return torch.cat(feats)


@dataclass
class CocoMetrics:
    """The metric networks: the FID Inception and a CLIP (image tower, text tower with projection, tokenizer)."""
    inception: torch.nn.Module
    image_encoder: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    clip_name: str               # part of the cache key of the CLIP image features
    device: torch.device


def score(metrics, entries, out, images_dir, batch=50, progress=True):
    """FID and CLIP score of the images in `out` for `entries` -> dict; features cached in out/.features."""
    out, images_dir, dev = Path(out), Path(images_dir), metrics.device
    fake = [image_path(out, e.index) for e in entries]
    missing = [p.name for p in fake if not p.is_file()]
    if missing:
        raise ValueError(f"{out}: {len(missing)} generated images missing (first {missing[0]}); rerun to finish")
    real = [images_dir / e.file_name for e in entries]
    absent = [str(p) for p in real if not p.is_file()]
    if absent:
        raise ValueError(f"--coco-images: {len(absent)} reference images missing (first {absent[0]})")
    cache = out / CACHE
    real_f = cached(cache, f"inception_ref_{dev.type}", real,
                    lambda ps: fid_features(metrics.inception, ps, dev, True, batch, "inception (reference)", progress))
    fake_f = cached(cache, f"inception_gen_{dev.type}", fake,
                    lambda ps: fid_features(metrics.inception, ps, dev, False, batch, "inception (generated)",
                                            progress))
    image_f = cached(cache, f"clip_{metrics.clip_name}_{dev.type}", fake,
                     lambda ps: clip_image_features(metrics.image_encoder, ps, dev, batch, progress))
    text_f = clip_text_features(metrics.text_encoder, metrics.tokenizer, [e.caption for e in entries], dev, batch,
                                progress)
    return {"n": len(entries), "fid": fid_from_features(fake_f, real_f), "clip_score": clip_score(image_f, text_f)}


def markdown_row(name, sampler, steps, guidance, result):
    """The README table's columns for a COCO run: model, sampler, steps, CFG, NFE / image, FID, CLIP score."""
    cfg = f"{guidance:g}" if guidance > 1 else "-"
    nfe = steps * (2 if guidance > 1 else 1)
    header = ("| model | sampler | steps | CFG | NFE / image | FID | CLIP score |\n"
              "|---|---|---:|---:|---:|---:|---:|")
    row = f"| {name} | {sampler} | {steps} | {cfg} | {nfe} | {result['fid']:.2f} | {result['clip_score']:.4f} |"
    return header, row
