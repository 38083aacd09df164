"""Scaled dot-product attention: softmax(q k^T * scale + mask) v.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D); key_padding_mask (B, Lk) bool, True = attend.
Triton kernel: TODO (issue 9). Until then every device uses PyTorch.
"""
import torch
import torch.nn.functional as F


def attention_ref(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """The spec, in plain PyTorch with fp32 softmax statistics."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if is_causal:
        lq, lk = s.shape[-2:]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(lk - lq)
        s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)


def attention(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """Public op. Off CUDA it calls PyTorch's fused SDPA (same semantics as attention_ref)."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
        if is_causal:
            lq, lk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
