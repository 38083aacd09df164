"""T5's RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, statistics in fp32, no mean subtraction, no bias.

Triton kernel: TODO (issue 9). Until then every device uses PyTorch.
"""
import torch


def rms_norm_ref(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # T5 casts back to the weight's dtype before scaling (half-precision checkpoints).
    return weight * y.to(weight.dtype)


def rms_norm(x, weight, eps=1e-6):
    return rms_norm_ref(x, weight, eps)
