"""GroupNorm over (N, C, *spatial) input with an optional fused SiLU, as Triton kernels.

y = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c], then silu(y) = y * sigmoid(y) if asked;
mean_g and var_g (biased) over the C / num_groups channels and all spatial positions of a group
(Wu & He 2018, the norm of every UNet and VAE resnet block; diffusers follows it with SiLU).
Input any float dtype (fp16, bf16, fp32), any spatial shape (odd sizes fine); weight and bias (C,) or
None; output in x's dtype. Statistics are fp32.

Kernels. Forward (2 launches): partial stats, one program per chunk of up to 8 tiles of an (n, c) row
of HW contiguous values, merging tiles with Chan et al.'s (count, mean, M2) update (each tile two-pass,
so no catastrophic cancellation at 10^5-10^6 values per group); apply, programs over (n, c) x tiles,
each first combining its group's chunk partials into mean and 1/std, then writing the normalised, affine,
optionally SiLU'd values. Three passes over memory instead of five for F.group_norm + F.silu. (A separate
finalize launch for the group statistics was dropped after an H200 run: at UNet sizes the op is bound by
its launches, each costing the host 50-100 us, not by memory; docs/gpu.md.)
Backward (2 launches): per-chunk sums of g and g * x_hat (g = dL/d(affine output), through the
SiLU), then dx = rstd * (g w - mean_group(g w) - x_hat * mean_group(g w x_hat)); dweight and dbias
sum those (N, C) sums over the batch in PyTorch.
Limits: non-contiguous input (channels-last) is copied to NCHW first.
Dispatch: CUDA tensors (or any, under `kernels.force_triton()`) take Triton, others F.group_norm
(+ F.silu) in x's dtype (see group_norm for why not the reference).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import block_size, num_warps, use_triton


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """The spec: F.group_norm in fp32, then SiLU, cast back to x's dtype."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels. "row" = one (n, c) pair = HW contiguous values; the CPG rows of a group are adjacent,
# so row r belongs to group r // CPG (counted over n and g together). Long rows are cut into SPLIT
# chunks of CHUNK values so that a VAE-sized row (512 x 512) is read by many programs in parallel.
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _gn_partial_stats_kernel(X, PART, HW, CHUNK, BLOCK: tl.constexpr):
    """(mean, M2) of chunk s of row r -> PART[r, s]: Chan et al.'s merge of BLOCK-sized tiles."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, HW)
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        ok = idx < hi
        x = tl.load(X + row * HW + idx, mask=ok, other=0.0).to(tl.float32)
        n_t = tl.minimum(hi - start, BLOCK).to(tl.float32)
        t_mean = tl.sum(x, 0) / n_t
        d = tl.where(ok, x - t_mean, 0.0)
        t_m2 = tl.sum(d * d, 0)
        n_new = count + n_t
        delta = t_mean - mean
        mean = mean + delta * (n_t / n_new)
        m2 = m2 + t_m2 + delta * delta * (count * n_t / n_new)
        count = n_new
    part = PART + (row * tl.num_programs(1) + s) * 2
    tl.store(part, mean)
    tl.store(part + 1, m2)


@triton.jit
def _gn_group_stats(PART, grp, HW, CHUNK, SPLIT, CPG, eps, BLOCK_P: tl.constexpr):
    """Group mean and 1/std from its CPG * SPLIT chunk partials (adjacent in PART), two passes:
    mean = sum(n_k mean_k) / n, then M2 = sum(M2_k + n_k (mean_k - mean)^2)."""
    n_part = CPG * SPLIT
    base = PART + grp * n_part * 2
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, n_part, BLOCK_P):
        k = start + offs
        ok = k < n_part
        cnt = tl.minimum(CHUNK, HW - (k % SPLIT) * CHUNK).to(tl.float32)
        acc += tl.where(ok, cnt * tl.load(base + k * 2, mask=ok, other=0.0), 0.0)
    total = (CPG * HW).to(tl.float32)
    mean = tl.sum(acc, 0) / total
    acc = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, n_part, BLOCK_P):
        k = start + offs
        ok = k < n_part
        cnt = tl.minimum(CHUNK, HW - (k % SPLIT) * CHUNK).to(tl.float32)
        dm = tl.load(base + k * 2, mask=ok, other=0.0) - mean
        acc += tl.where(ok, tl.load(base + k * 2 + 1, mask=ok, other=0.0) + cnt * dm * dm, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(acc, 0) / total + eps)


@triton.jit
def _gn_fwd_kernel(X, Y, W, B, PART, MEAN, RSTD, C, HW, CPG, CHUNK, SPLIT, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Normalise tile program_id(1) of row r. Every program combines its group's chunk partials itself
    (a few hundred floats at most, read from L2) rather than waiting for a separate finalize launch; the
    group's first program also stores mean and 1/std for the backward."""
    row = tl.program_id(0).to(tl.int64)
    grp = row // CPG
    mean, rstd = _gn_group_stats(PART, grp, HW, CHUNK, SPLIT, CPG, eps, BLOCK_P)
    if (row % CPG == 0) & (tl.program_id(1) == 0):
        tl.store(MEAN + grp, mean)
        tl.store(RSTD + grp, rstd)
    c = row % C
    w = tl.load(W + c).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + c).to(tl.float32) if HAS_B else 0.0
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < HW
    x = tl.load(X + row * HW + offs, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + row * HW + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gn_grad_out(x, dy, mean, rstd, w, b, SILU: tl.constexpr):
    """x_hat and g = dL/dz for z = x_hat * w + b (through silu'(z) = s (1 + z (1 - s)), s = sigmoid(z))."""
    x_hat = (x - mean) * rstd
    g = dy
    if SILU:
        z = x_hat * w + b
        s = tl.sigmoid(z)
        g = dy * s * (1.0 + z * (1.0 - s))
    return x_hat, g


@triton.jit
def _gn_bwd_sums_kernel(X, DY, W, B, MEAN, RSTD, SUMS, C, HW, CPG, CHUNK,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk s of row r: SUMS[r, s] = (sum g, sum g * x_hat), the pieces of dbias and dweight."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    mean = tl.load(MEAN + row // CPG)
    rstd = tl.load(RSTD + row // CPG)
    c = row % C
    w = tl.load(W + c).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + c).to(tl.float32) if HAS_B else 0.0
    offs = tl.arange(0, BLOCK)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, HW)
    acc_g = tl.zeros([BLOCK], tl.float32)
    acc_gx = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        ok = idx < hi
        x = tl.load(X + row * HW + idx, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * HW + idx, mask=ok, other=0.0).to(tl.float32)
        x_hat, g = _gn_grad_out(x, dy, mean, rstd, w, b, SILU)
        acc_g += g  # dy = 0 outside the chunk, so g = 0 there
        acc_gx += g * x_hat
    out = SUMS + (row * tl.num_programs(1) + s) * 2
    tl.store(out, tl.sum(acc_g, 0))
    tl.store(out + 1, tl.sum(acc_gx, 0))


@triton.jit
def _gn_bwd_dx_kernel(X, DY, DX, W, B, MEAN, RSTD, SUMS, C, HW, CPG,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = row // CPG
    mean = tl.load(MEAN + grp)
    rstd = tl.load(RSTD + grp)
    c = row % C
    # Group means of dx_hat = g * w and of dx_hat * x_hat, from the per-row sums (SUMS is (rows, 2)).
    j = tl.arange(0, BLOCK_G)
    jok = j < CPG
    first = grp * CPG
    s_g = tl.load(SUMS + (first + j) * 2, mask=jok, other=0.0)
    s_gx = tl.load(SUMS + (first + j) * 2 + 1, mask=jok, other=0.0)
    if HAS_W:
        w_j = tl.load(W + (first + j) % C, mask=jok, other=0.0).to(tl.float32)
        s_g = s_g * w_j
        s_gx = s_gx * w_j
    mean_g = tl.sum(s_g, 0) / (CPG * HW)
    mean_gx = tl.sum(s_gx, 0) / (CPG * HW)
    w = tl.load(W + c).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + c).to(tl.float32) if HAS_B else 0.0
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < HW
    x = tl.load(X + row * HW + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * HW + offs, mask=ok, other=0.0).to(tl.float32)
    x_hat, g = _gn_grad_out(x, dy, mean, rstd, w, b, SILU)
    dx = rstd * (g * w - mean_g - x_hat * mean_gx)
    tl.store(DX + row * HW + offs, dx.to(DX.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd.
# ----------------------------------------------------------------------------------------------------

TILES_PER_CHUNK = 8  # a reduction program reads at most 8 tiles (8192 values) of a row


def _sizes(x, num_groups):
    """rows, C, HW, channels per group, tile, chunk, chunks per row."""
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    block = block_size(hw, 16, 1024)
    chunk = block * TILES_PER_CHUNK
    return n * c, c, hw, c // num_groups, block, chunk, triton.cdiv(hw, chunk)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu):
        rows, c, hw, cpg, block, chunk, split = _sizes(x, num_groups)
        part = torch.empty(rows, split, 2, device=x.device, dtype=torch.float32)
        _gn_partial_stats_kernel[(rows, split)](x, part, hw, chunk, BLOCK=block, num_warps=num_warps(block))
        groups = rows // cpg
        mean = torch.empty(groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        y = torch.empty_like(x)
        w, b = (x if t is None else t for t in (weight, bias))  # placeholder pointers when absent
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
        _gn_fwd_kernel[(rows, triton.cdiv(hw, block))](x, y, w, b, part, mean, rstd, c, hw, cpg, chunk, split, eps,
                                                       BLOCK=block, BLOCK_P=block_size(cpg * split, 16, 1024),
                                                       num_warps=num_warps(block), **flags)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.flags = num_groups, flags
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        rows, c, hw, cpg, block, chunk, split = _sizes(x, ctx.num_groups)
        w, b = (x if t is None else t for t in (weight, bias))
        sums = torch.empty(rows, split, 2, device=x.device, dtype=torch.float32)
        _gn_bwd_sums_kernel[(rows, split)](x, dy, w, b, mean, rstd, sums, c, hw, cpg, chunk, BLOCK=block,
                                           num_warps=num_warps(block), **ctx.flags)
        sums = sums.sum(1)  # (rows, 2), a fixed-order reduction: deterministic, unlike atomics
        dx = torch.empty_like(x)
        _gn_bwd_dx_kernel[(rows, triton.cdiv(hw, block))](
            x, dy, dx, w, b, mean, rstd, sums, c, hw, cpg, BLOCK=block,
            BLOCK_G=block_size(cpg, 2), num_warps=num_warps(block), **ctx.flags)
        sums = sums.view(x.shape[0], c, 2)
        dw = sums[..., 1].sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        db = sums[..., 0].sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        return dx, None, dw, db, None, None


def group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1)."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1] if x.dim() > 1 else '?'} channels (dim 1 of "
                         f"{tuple(x.shape)}) do not split into num_groups={num_groups}")
    return _GroupNorm.apply(x.contiguous(), num_groups, weight, bias, float(eps), bool(silu))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """Public op (F.group_norm's argument order, plus `silu`)."""
    if use_triton(x):
        return group_norm_triton(x, num_groups, weight, bias, eps, silu)
    # Not group_norm_ref: F.group_norm then F.silu in x's dtype is nn.GroupNorm + nn.SiLU, the upstream
    # resnet block, so CPU runs match it bit for bit in every dtype. For fp32 x it is the ref's
    # computation, same bits (tests/test_kernels.py checks it); for 16-bit x the normalised values are
    # rounded to x's dtype before the SiLU, where the ref (like the kernel) rounds once at the end.
    y = F.group_norm(x, num_groups, weight, bias, eps)
    # In place when autograd does not need y (sampling): the same values, and no fresh full-size tensor, whose
    # first-touch page faults cost as much as the SiLU itself at VAE resolutions on a CPU.
    return F.silu(y, inplace=not y.requires_grad) if silu else y
