"""LayerNorm over the last dimension, and the adaLN modulation norm(x) * (1 + scale) + shift (PixArt).

Triton kernel: TODO (issue 9). Until then every device uses PyTorch.
"""
import torch.nn.functional as F


def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x.float(), normalized_shape, None if weight is None else weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def layer_norm_modulated_ref(x, shift, scale, weight=None, bias=None, eps=1e-6):
    """shift, scale broadcast against x (B, L, C): (B, 1, C) or (1, 1, C)."""
    y = F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (y * (1 + scale.float()) + shift.float()).to(x.dtype)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def layer_norm_modulated(x, shift, scale, weight=None, bias=None, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale) + shift
