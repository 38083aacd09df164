"""Launch heuristics shared by the kernels, and the one switch that sends the public ops to Triton.

Dispatch: every public op runs its Triton kernels when `use_triton(x)` holds, i.e. for CUDA tensors, or
for any tensor inside `with force_triton():` (the tests and `bench/kernels.py --compile-only` use it on
CPU tensors, where the kernels need TRITON_INTERPRET=1 or a replaced launch). Elsewhere an op runs its
PyTorch path, as it does on every device inside `with pytorch_only():` (bench/profile_unet.py compares
the two paths on a GPU).

Sizes: one tile is a power of two covering a row (`block_size`); the warps per program grow with the
tile (`num_warps`), and the row-wise backward kernels cut the rows of each batch item into chunks so
that the whole grid is about four programs per SM (`row_chunks`). MAX_ROW is the widest row the
single-tile row kernels (layer_norm, rms_norm) hold in registers; wider rows take the PyTorch path.
"""
import contextlib

import torch
import triton

MAX_ROW = 16384

_mode = "auto"  # "auto": Triton for CUDA tensors; "triton": every tensor; "torch": none. Set by the blocks below.


@contextlib.contextmanager
def _dispatch(mode):
    global _mode
    before, _mode = _mode, mode
    try:
        yield
    finally:   # restore the previous setting, so blocks nest
        _mode = before


def force_triton(on=True):
    """Within the block, the public ops take the Triton path on every device (on=False: only on CUDA)."""
    return _dispatch("triton" if on else "auto")


def pytorch_only():
    """Within the block, the public ops take their PyTorch path on every device, CUDA included."""
    return _dispatch("torch")


def use_triton(x):
    return _mode == "triton" or (_mode == "auto" and x.is_cuda)


def block_size(n, lo=1, hi=None):
    """The power of two that covers n elements, clamped to [lo, hi]."""
    b = max(lo, triton.next_power_of_2(n))
    return b if hi is None else min(hi, b)


def num_warps(block):
    """Warps for a program that reduces a tile of `block` elements: more warps for wider tiles keep the
    registers per thread (and so spills) bounded."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def row_chunks(rows, device, batch=1):
    """(chunks, rows per chunk) for cutting each batch item's `rows` rows into chunks, one program per
    (item, chunk): about four programs per SM over the whole grid (2 "SMs" off CUDA, for the interpreter).
    Fewer, longer chunks mean fewer fp32 partial sums of the weight gradients to reduce afterwards."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    chunks = max(1, min(rows, triton.cdiv(4 * sms, batch)))
    per = triton.cdiv(rows, chunks)
    return triton.cdiv(rows, per), per
