"""The CPU fast path: bf16 where the CPU multiplies bf16 matrices natively, channels-last convolutions.

Intel CPUs since Sapphire Rapids (AMX tiles) and Cooper Lake, and AMD since Zen 4 (AVX512-BF16) multiply
bf16 matrices in hardware, several times faster than fp32: on the 2-core Sapphire Rapids machine this was
built on, a 2048^3 matmul runs at about 640 GFLOP/s in bf16 against 105 in fp32, and the SD1.5 UNet forward
about 8x faster. On other CPUs oneDNN still accepts bf16 but emulates it (converting to fp32 around each
fp32 FMA), which is slower than plain fp32; so the default is bf16 only where `native_bf16()` says so.

Detection goes through torch, not /proc/cpuinfo: `torch.cpu._is_amx_tile_supported()` and
`torch.cpu._is_avx512_bf16_supported()` read the CPUID bits that oneDNN's bf16 kernels dispatch on (and, on
Linux, whether the kernel granted AMX state to the process). They are underscored but are the helpers
torch's own CPU dispatch code and tests use. Not `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: it is true
on any AVX-512 CPU, including those without bf16 instructions, where bf16 is the slow, emulated path.

What stays fp32 under bf16 weights (each kept where the numerics need it):
- GroupNorm / LayerNorm statistics: PyTorch's CPU kernels accumulate mean and variance of 16-bit inputs in
  fp32 (kernels/group_norm.py, kernels/layer_norm.py say the same for the Triton kernels);
- softmax in attention: the CPU flash-attention kernel behind SDPA keeps the running max, the exponentials'
  sum and the output accumulator in fp32;
- timestep embeddings (flash/layers.py), the sampler's arithmetic and CFG (flash/schedule.py and
  flash/pipeline.py cast the denoiser's output to fp32 before any update), and the decoded image, which is
  cast to fp32 before it is scaled to [0, 1].

Layout: oneDNN's convolutions want channels-last (NHWC) tensors; fed NCHW, each bf16 convolution reorders
its input and output, and at the VAE decoder's full resolution that copying costs more than the
convolution. `channels_last(model)` converts the conv-heavy models once; ops between convolutions (GroupNorm,
SiLU, nearest upsampling, residual adds) have channels-last CPU kernels. Only the 16-bit CPU path is
converted: fp32 results stay bit-identical to the NCHW ones the parity tests pin.

Training stays fp32 on CPUs (train_autocast says why).
"""
import torch


def native_bf16():
    """True when this CPU has bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN uses."""
    if not torch.backends.mkldnn.is_available():
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_dtype_name(device):
    """The dtype a run on `device` gets by default: fp16 on CUDA, bf16 on a CPU with native bf16 matrix
    support, fp32 elsewhere (mps and other devices included)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "fp16"
    return "bf16" if kind == "cpu" and native_bf16() else "fp32"


def wants_channels_last(model):
    """A model on the CPU in a 16-bit dtype: oneDNN's bf16 convolutions then run channels-last."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


def channels_last(model):
    """Convert `model`'s 4-d weights to channels-last where wants_channels_last(model); idempotent."""
    if wants_channels_last(model):
        model.to(memory_format=torch.channels_last)
    return model


def train_autocast(device, precision):
    """The autocast context of a training step: bf16 on CUDA when precision is "auto", else a disabled one
    (fp32). Not on CPUs, even with native bf16: measured on the digits recipe's stages (1 thread, as
    recipes/digits.sh runs them, median s/step over 3 steps x 2 alternating runs), bf16 autocast made each
    slower: teacher 0.89 -> 1.28, teacher2 1.29 -> 1.88, flash 3.57 -> 3.69. Its small convs and matmuls
    (<= 128 channels, 16x16 latents) gain less from the bf16 units than the casts around them cost."""
    kind = torch.device(device).type
    return torch.autocast(kind, torch.bfloat16, enabled=precision == "auto" and kind == "cuda")
