"""Aspect-ratio buckets and the size conditioning of SDXL and PixArt-alpha 1024-MS.

Multi-aspect training (SDXL, Podell et al. 2023, Sec. 2.3; PixArt-alpha's 1024-MS model) sorts the images into
buckets of about the same pixel count and different aspect ratios, and draws every batch from one bucket, so a
batch has one shape and no image is squashed or cropped to a square. The bucket sets:
- `SDXL`: the 40 (height, width) pairs of the SDXL paper's multi-aspect appendix, about 1024^2 pixels each,
  sides multiples of 64; an image goes to the bucket of the nearest h / w.
- `PIXART_1024`, `PIXART_512`: PixArt-alpha's aspect-ratio bins as diffusers ships them
  (`ASPECT_RATIO_1024_BIN` / `ASPECT_RATIO_512_BIN`), keyed by a rounded ratio; an image goes to the nearest key
  (diffusers' `classify_height_width_bin`).
At another resolution the set is scaled by resolution / base and rounded to the model's size multiple.

The size conditioning of a sample (`SizeInfo`):
- SDXL's add_time_ids = original_size + crop_top_left + target_size (Sec. 2.2), with the arithmetic of diffusers'
  train_text_to_image_sdxl.py: resize the shorter side to the target (the longer one truncated to an integer,
  as torchvision's Resize does), then centre-crop, the offsets rounded: top = round((H' - h) / 2). For a bucket
  the image is resized to cover it, then cropped the same way.
- PixArt's `resolution` is the original (height, width) and `aspect_ratio` the bucket's ratio key, as
  PixArt-alpha's multi-scale dataset (InternalDataMS) feeds them; without buckets, target h / w.
The pixels are cut as flash's image folders always have (`fit`: the centred box of the target's aspect, then a
bicubic resize), the same region as the resize-then-crop above, up to the rounding of the box's edges.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SDXL = [(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
        (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
        (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
        (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
        (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512)]
# PixArt's bins: ratio key -> (height, width); the 512 set is the 1024 set's layout at half the pixels.
PIXART_KEYS = ["0.25", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52", "0.57", "0.6", "0.68",
               "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21", "1.29", "1.38", "1.46", "1.67",
               "1.75", "2.0", "2.09", "2.4", "2.5", "3.0", "4.0"]
PIXART_1024 = dict(zip(PIXART_KEYS, [
    (512, 2048), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600), (640, 1536), (704, 1472),
    (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
    (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832),
    (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1728, 576),
    (2048, 512)]))
PIXART_512 = dict(zip(PIXART_KEYS, [
    (256, 1024), (256, 928), (288, 896), (288, 864), (288, 832), (320, 800), (320, 768), (352, 736), (352, 704),
    (352, 672), (384, 672), (384, 640), (416, 608), (416, 576), (448, 576), (448, 544), (480, 544), (480, 512),
    (512, 512), (512, 480), (544, 480), (544, 448), (576, 448), (576, 416), (608, 416), (640, 384), (672, 384),
    (704, 352), (736, 352), (768, 320), (800, 320), (864, 288), (1024, 256)]))


@dataclass(frozen=True)
class Bucket:
    ratio: float            # the key an image's h / w is compared with
    size: tuple             # (height, width) in pixels


def bucket_set(family, resolution, multiple):
    """The standard buckets for a family at `resolution`: PixArt's bins (the 512 set up to 512 px), else
    SDXL's; scaled by resolution / base, sides rounded to `multiple`. Each keeps its ratio key, so an image is
    classified as at the base resolution; buckets that rounding makes the same size are batched together."""
    if family == "pixart":
        base, table = (512, PIXART_512) if resolution <= 512 else (1024, PIXART_1024)
        pairs = [(float(k), hw) for k, hw in table.items()]
    else:
        base, pairs = 1024, [(h / w, (h, w)) for h, w in SDXL]
    return [Bucket(ratio, tuple(max(multiple, round(s * resolution / base / multiple) * multiple) for s in (h, w)))
            for ratio, (h, w) in pairs]


def nearest_bucket(height, width, buckets):
    """Index of the bucket whose ratio is nearest h / w (the first of equals, as Python's min and diffusers)."""
    ar = height / width
    return min(range(len(buckets)), key=lambda j: abs(buckets[j].ratio - ar))


@dataclass(frozen=True)
class SizeInfo:
    original: tuple         # (height, width) of the image as stored
    crop: tuple             # (top, left) of the crop, in the resized image (SDXL's crop_top_left)
    target: tuple           # (height, width) trained at
    aspect_ratio: float     # PixArt's aspect-ratio condition: the bucket's key, or target h / w


def size_info(height, width, target, aspect_ratio=None):
    """The size conditioning of an image of (height, width) trained at target (h, w): diffusers' resize
    (covering the target, the other side truncated) and centre-crop offsets."""
    th, tw = target
    if th * width >= tw * height:        # the height binds: it becomes th
        rh, rw = th, int(th * width / height)
    else:
        rh, rw = int(tw * height / width), tw
    crop = (max(0, int(round((rh - th) / 2.0))), max(0, int(round((rw - tw) / 2.0))))
    return SizeInfo((height, width), crop, (th, tw), th / tw if aspect_ratio is None else aspect_ratio)


def square(size):
    """The size conditioning flash used before per-sample sizes: a square image, uncropped."""
    return SizeInfo((size, size), (0, 0), (size, size), 1.0)


def fit(img, target):
    """PIL image -> (3, h, w) float tensor in [-1, 1]: the centred box with the target's aspect ratio, resized
    (bicubic). For a square target this is exactly the folder datasets' centre-crop-and-resize."""
    img = img.convert("RGB")
    w, h = img.size
    th, tw = target
    if w * th >= h * tw:                 # wider than the target: keep the height
        ch, cw = h, min(w, round(h * tw / th))
    else:
        ch, cw = min(h, round(w * th / tw)), w
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch)).resize((tw, th), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1


def size_condition(family, sizes, dtype, device):
    """The denoiser's size keywords (inside added_cond) for a batch of SizeInfo: SDXL's time_ids (B, 6), PixArt's
    resolution (B, 2) and aspect_ratio (B, 1); {} for families without size conditioning."""
    if family == "sdxl":
        ids = [[*s.original, *s.crop, *s.target] for s in sizes]
        return {"time_ids": torch.tensor(ids, dtype=dtype, device=device)}
    if family == "pixart":
        return {"resolution": torch.tensor([list(s.original) for s in sizes], dtype=dtype, device=device),
                "aspect_ratio": torch.tensor([[s.aspect_ratio] for s in sizes], dtype=dtype, device=device)}
    return {}
