"""GroupNorm over NCHW (or NC...) input with an optional fused SiLU.

Triton kernel: TODO (issue 9). Until then every device uses PyTorch.
"""
import torch.nn.functional as F


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
