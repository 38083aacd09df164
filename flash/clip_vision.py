"""CLIP image tower (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; a ViT, Dosovitskiy et al. 2021), its input preprocessing, and the CLIP score of the paper's tables.

Follows transformers' CLIPVisionModelWithProjection: the module tree equals its key tree
(`vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}`, `vision_model.pre_layrnorm`
(sic), `vision_model.encoder.layers.{i}.*`, `vision_model.post_layernorm`, `visual_projection`), and the encoder
blocks are flash.clip's text blocks without the causal mask. weights/clip_vision.py loads transformers folders
and open_clip checkpoints into it.

    patches = conv(pixels)                       (B, N, C), N = (image_size / patch_size)^2, no bias
    x = [class token, patches] + positions       (B, 1 + N, C)
    x = encoder(pre_ln(x))                       pre-LN blocks, full (not causal) attention
    image_embeds = proj(post_ln(x[:, 0]))        (B, projection_dim), unnormalised, no bias

`preprocess` is CLIP's input pipeline, equal to transformers' CLIPImageProcessor (the PIL backend it uses
without torchvision): shorter side to 224 with PIL's bicubic, centre crop 224x224, /255, CLIP mean and std.
The resize is PIL's algorithm written out in torch. Not a call into PIL: the images arrive as tensors
(generated ones on the GPU), and a PIL round trip per image would tie the metric to PIL's API. Not
F.interpolate(mode="bicubic", antialias=True) either, although it uses the same kernel: PIL resizes in two
separable passes (horizontal, then vertical), each with 22-bit fixed-point weights and each rounded and
clipped to uint8. One float pass overshoots at sharp edges where PIL clips in between (up to 24/255 away on
noisy images); two rounded float passes still differ by 1-2 levels at rounding ties. `pil_resize` builds
PIL's integer weights and gives PIL's bytes exactly (tests/test_clip_vision.py).

Deviations from transformers: no `interpolate_pos_encoding` (every supported checkpoint is used at its
training resolution); positions are an `arange` at forward time, not a buffer; `forward` returns only
`image_embeds` (the eval needs nothing else).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash.clip import ACTIVATIONS, CLIPEncoder
from flash.config_check import checked_kwargs
from flash.layers import LayerNorm

# OpenAI CLIP's normalisation, measured on its training set; every CLIP checkpoint here was trained with it.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields that shape the network (defaults are transformers' defaults)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI) or "gelu" (LAION's open_clip models)
    layer_norm_eps: float = 1e-5


CONFIGS = {
    # OpenAI CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14): 303,966,208 parameters.
    "vit-l-14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                 hidden_act="quick_gelu"),
    # LAION ViT-g/14 (open_clip "ViT-g-14", laion2b_s12b_b42k), the paper's CLIP-score model: 1,012,645,632
    # parameters, heads of width 88.
    "vit-g-14": CLIPVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40,
                                 num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                                 hidden_act="gelu"),
}


def from_config_json(d):
    """A config.json dict -> CLIPVisionConfig: a CLIPVisionModelWithProjection config, or a CLIPModel one
    (its `vision_config`, with the top-level `projection_dim` that CLIPModel's visual projection uses).
    Unknown keys are ignored; unsupported values raise ValueError naming the field."""
    if "vision_config" in d:
        d = dict(d["vision_config"] or {}, **{k: d[k] for k in ("projection_dim",) if k in d})
    cfg = CLIPVisionConfig(**checked_kwargs(CLIPVisionConfig, d, None))
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by "
                         f"num_attention_heads={cfg.num_attention_heads}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
    if d.get("num_channels", 3) != 3:
        raise ValueError(f"num_channels={d['num_channels']} is not supported (CLIP reads RGB)")
    return cfg


# ----------------------------------------------------------------------------- the tower

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, c)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + N, C)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape[-2:])} give {x.shape[1] - 1} patches; this "
                             f"tower has positions for {self.position_embedding.num_embeddings - 1}")
        return x + self.position_embedding(torch.arange(x.shape[1], device=x.device))


class CLIPVisionTransformer(nn.Module):
    """The `vision_model.` subtree."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # transformers' spelling
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModel(nn.Module):
    """CLIP image tower with its projection: `forward(pixel_values (B, 3, S, S))` -> image_embeds (B, P).

    pixel_values are `preprocess`ed images; image_embeds are unnormalised, as transformers returns them."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixel_values):
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.to(self.visual_projection.weight.dtype)))
        for layer in vm.encoder.layers:
            x = layer(x)
        return self.visual_projection(vm.post_layernorm(x[:, 0]))  # the class token's final state


# ----------------------------------------------------------------------------- preprocessing

@functools.lru_cache(maxsize=32)
def pil_bicubic_weights(in_size, out_size):
    """(out_size, in_size) integer weights of PIL's 8-bit bicubic resample along one axis, as float64.

    PIL's Resample.c: the cubic kernel with a = -0.5, stretched by the scale when shrinking (antialiasing),
    taps within the support around (i + 0.5) * scale, each row normalised to sum 1, then rounded to 22-bit
    fixed point (half away from zero). Cached: a data set's images share a few sizes."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    center = (torch.arange(out_size, dtype=torch.float64)[:, None] + 0.5) * scale  # (out, 1)
    j = torch.arange(in_size, dtype=torch.float64)[None]  # (1, in)
    # C's (int) truncates toward zero; a negative start is clamped to 0 either way.
    inside = (j >= torch.trunc(center - support + 0.5)) & (j < torch.trunc(center + support + 0.5))
    x, a = ((j - center + 0.5) * (1 / stretch)).abs(), -0.5
    k = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, (((x - 5) * x + 8) * x - 4) * a)
    k = torch.where(inside & (x < 2), k, 0.0)
    total = k.sum(dim=1, keepdim=True)
    k = torch.where(total != 0, k / total, k)
    return torch.trunc(k * 2 ** 22 + torch.where(k < 0, -0.5, 0.5))


def pil_resize(x, size):
    """uint8-valued (..., H, W) -> (..., h, w) exactly as PIL's Image.resize(BICUBIC): horizontal pass, then
    vertical, each accumulated in fixed point (exact in float64: products stay far below 2^53), rounded
    half up and clipped to 0-255. A pass whose size does not change is skipped, as PIL skips it."""
    x = x.to(torch.float64)
    (h_in, w_in), (h, w) = x.shape[-2:], size
    if w != w_in:
        x = x @ pil_bicubic_weights(w_in, w).to(x.device).T
        x = torch.floor((x + 2 ** 21) / 2 ** 22).clamp(0, 255)
    if h != h_in:
        x = (pil_bicubic_weights(h_in, h).to(x.device) @ x)
        x = torch.floor((x + 2 ** 21) / 2 ** 22).clamp(0, 255)
    return x


def to_uint8_rgb(image):
    """One image -> (3, H, W) with integer values 0-255: uint8 (H, W) / (1|3, H, W), or float in [-1, 1] (the
    pipelines' output range), quantised as a PNG write would."""
    if image.ndim == 2:
        image = image[None]
    if image.is_floating_point():
        image = ((image.float() + 1) * 127.5).round().clamp(0, 255)
    elif image.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {image.dtype}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"an image must be (H, W), (1, H, W) or (3, H, W), got shape {tuple(image.shape)}")
    return image.expand(3, -1, -1)


def resize_crop(image, size=224):
    """CLIP's geometry for one image -> (3, size, size), values 0-255 (float64): shorter side to `size`
    (the longer one to int(size * long / short), truncated as transformers does), then the centre crop,
    whose offset rounds down."""
    x = to_uint8_rgb(image)
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    x = pil_resize(x, (size, new_long) if h <= w else (new_long, size))
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[:, top:top + size, left:left + size]


def preprocess(images, size=224):
    """Images (a batch tensor or a list of differently sized ones; see `to_uint8_rgb`) -> pixel_values
    (B, 3, size, size) float32, normalised with CLIP's mean and std."""
    x = torch.stack([resize_crop(im, size) for im in images]).float() / 255
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (x - mean) / std


# ----------------------------------------------------------------------------- CLIP score

def clip_score(image_embeds, text_embeds):
    """Mean cosine similarity of paired image and caption embeddings, unscaled (in [-1, 1]).

    The paper's table reports values like 0.306, i.e. this number, not torchmetrics' 100 * max(cos, 0)."""
    return F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1).mean().item()
