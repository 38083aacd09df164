"""T5 v1.1 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"; v1.1: gated-GELU feed-forward, no dropout at inference, untied head), the text encoder of PixArt.

Follows transformers' T5EncoderModel: the module tree equals its key tree (`shared`, `encoder.embed_tokens`,
`encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`, `...relative_attention_bias` in block 0 only,
`layer.0.layer_norm`, `layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `layer.1.layer_norm`,
`encoder.final_layer_norm`), so a `model.safetensors` loads as-is.

T5 specifics worth knowing:
- no absolute positions: block 0 owns a learned bias per (relative-distance bucket, head) that is added to
  the attention scores of every layer;
- no 1/sqrt(d) scaling of the scores (T5 folds it into the initialisation of q);
- RMSNorm without bias or mean subtraction; no biases anywhere.
Deviation: transformers' fp16 clamp keeps |x| <= max - 1000 only once an inf appeared; we always clamp
fp16 activations to that range (identical unless a value lies within 1000 of the fp16 maximum).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import kernels
from flash.config_check import checked_kwargs


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucketing of (key - query) distances into [0, num_buckets).

    Half the buckets for each sign. Within a half, distances below num_buckets/4 get a bucket each; larger
    ones share logarithmically wider buckets up to max_distance, beyond which all share the last bucket.
    """
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    # clamp(min=1) only avoids log(0); those small distances take the exact branch of the where below.
    log_ratio = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


def clamp_fp16(x):
    """T5 XXL's activations can overflow fp16; transformers clamps them so an inf does not poison the rest."""
    if x.dtype == torch.float16:
        big = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-big, big)
    return x


class T5LayerNorm(nn.Module):
    """RMSNorm (weight only), computed by kernels.rms_norm in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    """Multi-head self-attention plus T5's additive relative-position bias (the table lives in block 0 only)."""

    def __init__(self, cfg, *, has_relative_attention_bias=False):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads = cfg.num_heads
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length, device):
        """(1, H, L, L) additive score bias from the learned per-bucket, per-head table."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x, position_bias, key_padding_mask=None):
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads) for t in (self.q(x), self.k(x), self.v(x)))
        # scale=1: T5 does not divide scores by sqrt(d_kv). The position bias enters as an additive bias.
        out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask, scale=1.0, attn_bias=position_bias)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class T5LayerSelfAttention(nn.Module):
    """Pre-norm self-attention with a residual."""

    def __init__(self, cfg, *, has_relative_attention_bias=False):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, position_bias, key_padding_mask=None):
        return x + self.SelfAttention(self.layer_norm(x), position_bias, key_padding_mask)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        # transformers' "gelu_new" is the tanh approximation of GELU.
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg, *, has_relative_attention_bias=False):
        super().__init__()
        # Index 0 self-attention, index 1 feed-forward (a decoder would put cross-attention at 1).
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias=has_relative_attention_bias),
                                    T5LayerFF(cfg)])

    def forward(self, x, position_bias, key_padding_mask=None):
        x = clamp_fp16(self.layer[0](x, position_bias, key_padding_mask))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(T5Block(cfg, has_relative_attention_bias=(i == 0)) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """`forward(input_ids, attention_mask=None)` -> last_hidden_state (B, L, d_model).

    attention_mask (B, L), 1 = real token, 0 = padding: padded keys are masked out (PixArt pads to 120).
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # `encoder.embed_tokens` IS `shared` (one module under two names), as in transformers: both keys appear in
        # the state dict, the parameter is counted once, and a checkpoint holding either name fills both.
        self.encoder = T5Stack(cfg, self.shared)

    def forward(self, input_ids, attention_mask=None):
        enc = self.encoder
        key_padding_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        x = enc.embed_tokens(input_ids)  # (B, L, d_model)
        # Computed once from block 0's table and shared by all layers.
        bias = enc.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], input_ids.device).to(x.dtype)
        for block in enc.block:
            x = block(x, bias, key_padding_mask)
        return enc.final_layer_norm(x)


# ----------------------------------------------------------------------------- config

@dataclass
class T5Config:
    """transformers' T5Config fields that shape the encoder."""
    # Defaults are transformers' T5Config defaults, so a config.json that omits a field reads the same.
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64          # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # only "gated-gelu" (T5 v1.1) is supported; "relu" is T5 v1.0


CONFIGS = {
    # google/t5-v1_1-xxl encoder as used by PixArt-alpha: about 4.76B parameters.
    "t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                            relative_attention_num_buckets=32, relative_attention_max_distance=128,
                            layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"),
}


def from_config_json(d):
    """A transformers config.json dict -> T5Config. Unknown keys are ignored; unsupported values raise."""
    cfg = T5Config(**checked_kwargs(T5Config, d, None))
    if cfg.feed_forward_proj != "gated-gelu":
        raise ValueError(f"feed_forward_proj={cfg.feed_forward_proj!r} is not supported "
                         f"(only the T5 v1.1 'gated-gelu')")
    # transformers lets dense_act_fn follow feed_forward_proj ("gated-gelu" -> "gelu_new"); refuse an override.
    if d.get("dense_act_fn", "gelu_new") != "gelu_new":
        raise ValueError(f"dense_act_fn={d['dense_act_fn']!r} is not supported (gated-gelu uses 'gelu_new')")
    return cfg
