"""LayerNorm over the trailing dims, and the adaLN modulation norm(x) * (1 + scale) + shift, in Triton.

layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape) dims
(Ba et al. 2016); weight/bias optional. layer_norm_modulated: the same followed by PixArt-alpha's adaLN
modulation (Chen et al. 2023, "adaLN-single"; DiT's `modulate`) with shift and scale (B, 1, C) or
(1, 1, C), broadcast over the tokens of x (B, L, C); all in one pass.
Dtypes: any float x; parameters may be another float dtype; statistics and arithmetic in fp32, one
rounding to x's dtype at the end (PyTorch's modulated path rounds after each op in x's dtype).

Kernels: forward one program per row, the whole row in registers (two-pass mean/variance), saving
mean and rstd. Backward: programs over (batch, chunk of rows); each writes dx for its rows and fp32
partial sums (chunk, C) of dweight, dbias, dshift, dscale, reduced in PyTorch.
Limits: rows up to 16384 elements in the kernel (wider ones, and shift/scale that vary per token,
take the PyTorch path). dx = rstd * (dxh - mean(dxh) - x_hat * mean(dxh * x_hat)), dxh = dz * weight.
Dispatch: CUDA tensors (or any, under `kernels.force_triton()`) take Triton, others PyTorch's ops
in x's dtype (see the public ops for why not the references).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import MAX_ROW, block_size, num_warps, row_chunks, use_triton


def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x.float(), normalized_shape, None if weight is None else weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def layer_norm_modulated_ref(x, shift, scale, weight=None, bias=None, eps=1e-6):
    """shift, scale broadcast against x (B, L, C): (B, 1, C) or (1, 1, C)."""
    y = F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (y * (1 + scale.float()) + shift.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels. x is viewed as (B, L, C) contiguous; row r = b * L + l. Plain layer_norm has B = 1.
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _ln_fwd_kernel(X, Y, W, B, SHIFT, SCALE, MEAN, RSTD, L, C, s_sh_b, s_sh_c, s_sc_b, s_sc_c, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    d = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / C + eps)
    y = d * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_MOD:
        b = row // L
        sh = tl.load(SHIFT + b * s_sh_b + cols * s_sh_c, mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_sc_b + cols * s_sc_c, mask=ok, other=0.0).to(tl.float32)
        y = y * (1.0 + sc) + sh
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_kernel(X, DY, DX, W, B, SCALE, MEAN, RSTD, PART, L, C, ROWS_PER, s_sc_b, s_sc_c,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [chunk * ROWS_PER, ...) of batch b. PART (B, chunks, 4, C): dweight, dbias, dshift, dscale."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) if HAS_W else 1.0
    bias = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32) if HAS_B else 0.0
    sc = 0.0
    if HAS_MOD:
        sc = tl.load(SCALE + b * s_sc_b + cols * s_sc_c, mask=ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_C], tl.float32)
    acc_db = tl.zeros([BLOCK_C], tl.float32)
    acc_dsh = tl.zeros([BLOCK_C], tl.float32)
    acc_dsc = tl.zeros([BLOCK_C], tl.float32)
    start = chunk * ROWS_PER
    end = tl.minimum(start + ROWS_PER, L)
    for l in range(start, end):
        row = b * L + l
        x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * C + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(ok, (x - mean) * rstd, 0.0)
        dz = dy  # gradient w.r.t. the affine output z = x_hat * w + b
        if HAS_MOD:
            acc_dsh += dy
            acc_dsc += dy * (x_hat * w + bias)
            dz = dy * (1.0 + sc)
        acc_dw += dz * x_hat
        acc_db += dz
        dxh = dz * w
        dx = rstd * (dxh - tl.sum(dxh, 0) / C - x_hat * (tl.sum(dxh * x_hat, 0) / C))
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=ok)
    part = PART + ((b * tl.num_programs(1) + chunk) * 4) * C + cols
    tl.store(part, acc_dw, mask=ok)
    tl.store(part + C, acc_db, mask=ok)
    tl.store(part + 2 * C, acc_dsh, mask=ok)
    tl.store(part + 3 * C, acc_dsc, mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd.
# ----------------------------------------------------------------------------------------------------

def _sum_to(g, shape):
    """Reduce a broadcast gradient back to the operand's shape."""
    lead = g.dim() - len(shape)
    g = g.sum(tuple(range(lead))) if lead else g
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dims, keepdim=True) if dims else g


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, c, eps):
        """x (..., c) normalised over its last c elements; with shift/scale: x (B, ..., C) and shift/scale
        broadcastable to x, constant over the middle (token) dims (checked by the caller)."""
        has_mod = shift is not None
        bsz = x.shape[0] if has_mod else 1
        x3 = x.contiguous().view(bsz, -1, c)
        rows = x3.shape[1]
        block_c = block_size(c)
        y = torch.empty_like(x3)
        mean = torch.empty(bsz * rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        sh3, sc3 = (_rows_view(t, x.shape, x3.shape) for t in (shift, scale)) if has_mod else (x3, x3)
        w, b = (x3 if t is None else t.reshape(c) for t in (weight, bias))
        _ln_fwd_kernel[(bsz * rows,)](
            x3, y, w, b, sh3, sc3, mean, rstd, rows, c, sh3.stride(0), sh3.stride(2), sc3.stride(0), sc3.stride(2),
            eps, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=has_mod, BLOCK_C=block_c,
            num_warps=num_warps(block_c))
        ctx.save_for_backward(x3, weight, bias, shift, scale, mean, rstd)
        ctx.x_shape, ctx.has_mod = x.shape, has_mod
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, weight, bias, shift, scale, mean, rstd = ctx.saved_tensors
        bsz, rows, c = x3.shape
        dy = dy.contiguous().view(x3.shape)
        block_c = block_size(c)
        chunks, per = row_chunks(rows, x3.device, bsz)
        part = torch.empty(bsz, chunks, 4, c, device=x3.device, dtype=torch.float32)
        dx = torch.empty_like(x3)
        sc3 = _rows_view(scale, ctx.x_shape, x3.shape) if ctx.has_mod else x3
        w, b = (x3 if t is None else t.reshape(c) for t in (weight, bias))
        _ln_bwd_kernel[(bsz, chunks)](
            x3, dy, dx, w, b, sc3, mean, rstd, part, rows, c, per, sc3.stride(0), sc3.stride(2),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=ctx.has_mod, BLOCK_C=block_c,
            num_warps=num_warps(block_c))
        need = ctx.needs_input_grad
        sums = part.sum(1)  # (B, 4, C)
        dw = sums[:, 0].sum(0).to(weight.dtype).view(weight.shape) if weight is not None and need[1] else None
        db = sums[:, 1].sum(0).to(bias.dtype).view(bias.shape) if bias is not None and need[2] else None
        dsh = dsc = None
        if ctx.has_mod:  # (B, C) -> (B, 1, ..., 1, C) -> the operand's own broadcast shape
            mid = [1] * (len(ctx.x_shape) - 2)
            dsh = _sum_to(sums[:, 2].view(bsz, *mid, c), shift.shape).to(shift.dtype) if need[3] else None
            dsc = _sum_to(sums[:, 3].view(bsz, *mid, c), scale.shape).to(scale.dtype) if need[4] else None
        return dx.view(ctx.x_shape), dw, db, dsh, dsc, None, None


def _rows_view(t, x_shape, x3_shape):
    """t broadcast to x, as a (B, L, C) view (stride 0 along L when t is per-sample)."""
    return torch.broadcast_to(t, x_shape).reshape(x3_shape)


def _modulation_ok(x, shift, scale):
    """True when shift and scale broadcast to x with one value per (sample, channel), as a view."""
    if x.dim() < 2 or shift.dim() > x.dim() or scale.dim() > x.dim():
        return False
    x3_shape = (x.shape[0], x[0].numel() // x.shape[-1], x.shape[-1])
    try:  # on the meta device: shapes and strides only, never a copy
        return all(_rows_view(torch.empty_strided(t.shape, t.stride(), device="meta"), x.shape, x3_shape)
                   .stride(1) == 0 for t in (shift, scale))
    except RuntimeError:  # not broadcastable: PyTorch's path raises its own error
        return False


def _normalized_size(x, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"layer_norm: normalized_shape {shape} does not end x's shape {tuple(x.shape)}")
    c = 1
    for n in shape:
        c *= n
    return c


def layer_norm_triton(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1)."""
    c = _normalized_size(x, normalized_shape)
    if c > MAX_ROW:
        raise ValueError(f"layer_norm: rows of {c} elements exceed the kernel's limit of {MAX_ROW}")
    return _LayerNorm.apply(x, weight, bias, None, None, c, float(eps))


def layer_norm_modulated_triton(x, shift, scale, weight=None, bias=None, eps=1e-6):
    if not _modulation_ok(x, shift, scale) or x.shape[-1] > MAX_ROW:
        raise ValueError(f"layer_norm_modulated: x {tuple(x.shape)} with shift {tuple(shift.shape)}, scale "
                         f"{tuple(scale.shape)}: need x (B, ..., C <= {MAX_ROW}) and shift/scale like (B, 1, C)")
    return _LayerNorm.apply(x, weight, bias, shift, scale, x.shape[-1], float(eps))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Public op (F.layer_norm's argument order)."""
    if use_triton(x) and x.numel() and _normalized_size(x, normalized_shape) <= MAX_ROW:
        return layer_norm_triton(x, normalized_shape, weight, bias, eps)
    # Not layer_norm_ref: F.layer_norm in x's dtype is nn.LayerNorm's computation, so CPU runs match the
    # upstream models bit for bit in every dtype. For fp32 x it is the ref's computation, same bits
    # (tests/test_kernels.py checks it); for 16-bit x PyTorch's CPU kernel can differ in the last bit
    # from the ref's fp32 math rounded once.
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def layer_norm_modulated(x, shift, scale, weight=None, bias=None, eps=1e-6):
    """Public op: layer_norm(x) * (1 + scale) + shift with shift/scale broadcast over tokens."""
    if use_triton(x) and x.numel() and x.shape[-1] <= MAX_ROW and _modulation_ok(x, shift, scale):
        return layer_norm_modulated_triton(x, shift, scale, weight, bias, eps)
    # Not layer_norm_modulated_ref: this is PixArt's (and DiT's `modulate`) composition in x's dtype, as
    # the upstream model computes it. Same bits as the ref for fp32 operands (tests/test_kernels.py
    # checks it); with 16-bit operands each op here rounds to x's dtype, the ref rounds once at the end.
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale) + shift
