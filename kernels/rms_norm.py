"""T5's RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, statistics in fp32, no mean subtraction, no bias.

Zhang & Sennrich 2019, as T5 (and transformers' T5LayerNorm) apply it: the normalised fp32 value is
cast to the weight's dtype before the multiply, so the output dtype is the weight's. The kernel does
the multiply in fp32 on the cast value; a product of two 16-bit floats is exact in fp32, so rounding
it once to the weight's dtype matches PyTorch's 16-bit multiply bit for bit.
x (..., C) with C up to 16384 in the kernel (wider rows take the PyTorch path); weight (C,).
Kernels: forward one program per row (saves rstd); backward programs over chunks of rows, each
writing dx and an fp32 partial dweight row, summed in PyTorch. With y = x * rstd and dy_hat = dout * w,
dx = rstd * (dy_hat - y * mean(dy_hat * y)), dweight = sum_rows(dout * cast(y)) (the cast passes the
gradient straight through, as autograd does).
Dispatch: CUDA tensors (or any, under `kernels.force_triton()`) take Triton, others `rms_norm_ref`.
"""
import torch
import triton
import triton.language as tl

from kernels.launch import MAX_ROW, block_size, num_warps, row_chunks, use_triton


def rms_norm_ref(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # T5 casts back to the weight's dtype before scaling (half-precision checkpoints).
    return weight * y.to(weight.dtype)


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
    w = tl.load(W + cols, mask=ok, other=0.0)
    y = (x * rstd).to(W.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(X, W, DY, DX, RSTD, DW_PART, R, C, ROWS_PER, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_C], tl.float32)
    start = chunk.to(tl.int64) * ROWS_PER  # 64-bit bounds make the loop index (and offsets) 64-bit
    end = tl.minimum(start + ROWS_PER, R)
    for row in range(start, end):
        x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(DY + row * C + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        y = x * rstd
        acc_dw += dout * y.to(W.dtype.element_ty).to(tl.float32)
        dy_hat = dout * w
        dx = rstd * (dy_hat - y * (tl.sum(dy_hat * y, 0) / C))
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW_PART + chunk.to(tl.int64) * C + cols, acc_dw, mask=ok)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        c = x.shape[-1]
        x2 = x.contiguous().view(-1, c)
        rows, block_c = x2.shape[0], block_size(c)
        y = torch.empty(x2.shape, device=x.device, dtype=weight.dtype)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        _rms_fwd_kernel[(rows,)](x2, weight, y, rstd, c, eps, BLOCK_C=block_c, num_warps=num_warps(block_c))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, weight, rstd = ctx.saved_tensors
        rows, c = x2.shape
        dout = dout.contiguous().view(rows, c)
        block_c = block_size(c)
        chunks, per = row_chunks(rows, x2.device)
        dx = torch.empty_like(x2)
        part = torch.empty(chunks, c, device=x2.device, dtype=torch.float32)
        _rms_bwd_kernel[(chunks,)](x2, weight, dout, dx, rstd, part, rows, c, per, BLOCK_C=block_c,
                                   num_warps=num_warps(block_c))
        dw = part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None


def rms_norm_triton(x, weight, eps=1e-6):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1)."""
    if weight.shape != x.shape[-1:] or x.shape[-1] > MAX_ROW:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be x's last dim {tuple(x.shape[-1:])} "
                         f"(at most {MAX_ROW})")
    return _RMSNorm.apply(x, weight, float(eps))


def rms_norm(x, weight, eps=1e-6):
    """Public op: T5LayerNorm.forward as a function."""
    if use_triton(x) and x.numel() and x.shape[-1] <= MAX_ROW:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
