"""CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"), the text encoder of SD1.x (OpenAI ViT-L/14) and SDXL (OpenAI ViT-L/14 + OpenCLIP ViT-bigG/14).

Follows transformers' CLIPTextModel / CLIPTextModelWithProjection: the module tree equals the key tree of
their checkpoints (`text_model.embeddings.token_embedding`, `text_model.encoder.layers.{i}.self_attn.q_proj`,
..., `text_model.final_layer_norm`, optional `text_projection`), so a `model.safetensors` loads as-is.

Deviations from transformers:
- transformers keeps `position_ids` as a (non-persistent) buffer; here positions are an `arange` made at
  forward time, so a model built on the meta device has no tensor left to fill after loading.
- transformers >= 5 dropped the `text_model.` wrapper inside CLIPTextModel (its saves have bare
  `embeddings.*` keys); we keep the wrapper because the released checkpoints (SD1.5 `text_encoder`,
  saved by transformers 4) and CLIPTextModelWithProjection use it. weights/text.py adds the prefix.
- `forward` returns the three states the diffusion pipelines use instead of a list of all hidden states.
- `with_projection` is not a transformers field: it stands for the class (CLIPTextModelWithProjection).

The image tower (flash/clip_vision.py) reuses the encoder blocks with `causal=False`.
"""
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import kernels
from flash.config_check import checked_kwargs
from flash.layers import LayerNorm


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def eos_positions(input_ids, eos_token_id):
    """Index of the token whose final state is the pooled text embedding, exactly as transformers picks it.

    Configs written before transformers PR #24773 say eos_token_id == 2 (a wrong value); transformers keeps
    their original behaviour, the argmax of the ids (the end-of-text token has the largest id). Newer configs
    take the first position equal to eos_token_id (the pad token may equal eos, so "first" matters).
    Like transformers, assumes every row contains the token.
    """
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor         # (B, L, C) after the final LayerNorm (SD1.x conditioning)
    penultimate_hidden_state: torch.Tensor  # (B, L, C) output of layer N-1, before any final norm (SDXL)
    pooled: torch.Tensor                    # (B, C) or (B, projection_dim): final-LN state at EOS, projected if any


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids):
        length, positions = input_ids.shape[1], self.position_embedding.num_embeddings
        if length > positions:
            raise ValueError(f"input_ids has {length} tokens; this CLIP has {positions} positions")
        return self.token_embedding(input_ids) + self.position_embedding(torch.arange(length, device=input_ids.device))


class CLIPAttention(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.heads, self.causal = cfg.num_attention_heads, causal
        c = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x, key_padding_mask=None):
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads)
                   for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
        # CLIP's text tower is causal (each token sees itself and the tokens before it); the image tower is not.
        out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=self.causal)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, key_padding_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), key_padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """The `text_model.` subtree: embeddings, encoder layers, final LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder. `forward(input_ids, attention_mask=None)` -> CLIPTextOutput.

    attention_mask (B, L), 1 = real token, 0 = padding, is a key-padding mask on top of the causal mask.
    The SD pipelines pass none (CLIP was trained without one); padded positions then still see the pad tokens.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        # OpenCLIP's projection into the joint image-text space; SDXL uses it as the pooled text embedding.
        self.text_projection = None
        if cfg.with_projection:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None):
        tm = self.text_model
        key_padding_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        x = tm.embeddings(input_ids)  # (B, L, C)
        penultimate = x
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, key_padding_mask)
            if i == len(tm.encoder.layers) - 2:
                penultimate = x  # hidden_states[-2] in transformers' numbering (hidden_states[0] = embeddings)
        last = tm.final_layer_norm(x)
        eos = eos_positions(input_ids, self.config.eos_token_id)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(last, penultimate, pooled)


# ----------------------------------------------------------------------------- config

@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields that shape the network, plus `with_projection` (the class)."""
    # Defaults are transformers' CLIPTextConfig defaults, so a config.json that omits a field reads the same.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP bigG)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512
    with_projection: bool = False  # not in transformers: True for CLIPTextModelWithProjection


CONFIGS = {
    # OpenAI CLIP ViT-L/14 text tower (SD1.x text_encoder, SDXL text_encoder): 123,060,480 params.
    # The released configs carry eos_token_id 2 (written before transformers fixed the field), which selects
    # the legacy argmax pooling; it finds <|endoftext|> because 49407 is the largest id in the vocabulary.
    "clip-l": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, eos_token_id=2, projection_dim=768),
    # OpenCLIP ViT-bigG/14 text tower with its projection (SDXL text_encoder_2).
    "openclip-bigg": CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                    num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                    hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=2, projection_dim=1280,
                                    with_projection=True),
}

ACTIVATIONS = ("quick_gelu", "gelu")


def from_config_json(d):
    """A transformers config.json dict -> CLIPTextConfig. Unknown keys are ignored; unsupported values raise."""
    kwargs = checked_kwargs(CLIPTextConfig, d, None)
    cfg = CLIPTextConfig(**{k: v for k, v in kwargs.items() if k != "with_projection"})
    cfg = replace(cfg, with_projection="CLIPTextModelWithProjection" in (d.get("architectures") or []))
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by "
                         f"num_attention_heads={cfg.num_attention_heads}")
    return cfg
