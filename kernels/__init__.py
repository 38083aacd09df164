"""Fused ops the models call. Each dispatches to a Triton kernel for CUDA tensors (or any tensor under
`force_triton()`) and to PyTorch elsewhere (and everywhere under `pytorch_only()`)."""
from kernels.attention import attention
from kernels.group_norm import group_norm
from kernels.launch import force_triton, pytorch_only
from kernels.layer_norm import layer_norm, layer_norm_modulated
from kernels.rms_norm import rms_norm

__all__ = ["attention", "force_triton", "group_norm", "layer_norm", "layer_norm_modulated", "pytorch_only", "rms_norm"]
