"""Scaled dot-product attention, softmax(q k^T * scale + mask) v, as a FlashAttention-2 Triton kernel.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D); key_padding_mask (B, Lk) bool, True = attend;
attn_bias (optional) an additive float bias broadcastable to (B, H, Lq, Lk), added to the scaled
scores before masking (T5's relative position bias). Output (B, H, Lq, D) in q's dtype and layout.
Causal masking follows `torch.tril(diagonal=Lk - Lq)` (the last query sees every key), as SDPA does.

Follows Dao, "FlashAttention-2" (arXiv 2307.08691): the forward streams key/value blocks through an
online softmax (running max and sum, fp32 accumulator) and saves only the log-sum-exp per query row;
the backward recomputes the probabilities from it, one kernel for dK/dV (loop over query blocks) and
one for dQ (loop over key blocks), so no atomics and deterministic gradients.

Limits and deviations:
- fp16, bf16, fp32 inputs; head dims up to 256 (40, 72, 80, 160 are padded to the next power of two
  with masked loads); any Lq, Lk (ragged last blocks are masked).
- fp32 inputs on a GPU use TF32 tensor-core dots unless `torch.get_float32_matmul_precision()` is
  "highest" (PyTorch's default), in which case the dots are full IEEE fp32 (slower).
- A query row whose keys are all masked returns zeros and zero gradients (PyTorch returns NaN there).
- attn_bias is not fused: a call with a bias takes the PyTorch path on every device.
Dispatch: CUDA tensors take the Triton kernels, everything else `F.scaled_dot_product_attention`
(see `attention` for why not the reference); under `kernels.force_triton()` (tests, with
TRITON_INTERPRET=1) CPU tensors take the kernels too.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import block_size, use_triton


def attention_ref(q, k, v, key_padding_mask=None, is_causal=False, scale=None, attn_bias=None):
    """The spec, in plain PyTorch with fp32 softmax statistics."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if attn_bias is not None:
        s = s + attn_bias.float()
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if is_causal:
        lq, lk = s.shape[-2:]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(lk - lq)
        s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels. Scores live in the log2 domain: s2 = q.k * scale * log2(e), so exp2 replaces exp
# (one multiply folded into the scale) and the saved LSE is log2(sum exp2(s2)).
# Grids: axis 0 walks blocks of the sequence, axis 1 the B*H (batch, head) pairs.
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, MASK,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb, smn,
                     H, LQ, LK, qk_scale,
                     HEAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D  # folds away when HEAD_D is a power of two
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m[:, None] < LQ) & d_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # A finite start for the running max: a fully masked block then gives exp2(-inf - m) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = LK
    if IS_CAUSAL:  # keys past the diagonal of this query block are never needed
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M + LK - LQ)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < LK) & d_ok
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if not EVEN_N:
            s = tl.where(cols[None, :] < LK, s, float("-inf"))
        if HAS_MASK:
            keep = tl.load(MASK + b * smb + cols * smn, mask=cols < LK, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        if IS_CAUSAL:
            s = tl.where(cols[None, :] <= offs_m[:, None] + (LK - LQ), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, and LSE = +inf makes the backward's P exactly 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < LQ) & d_ok)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, LQ,
                           HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the row term of the softmax Jacobian."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < LQ) & (offs_d[None, :] < HEAD_D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK,
                          sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                          sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, smb, smn,
                          H, LQ, LK, qk_scale, sm_scale,
                          HEAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                          DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of keys: dV = P^T dO, dK = scale * dS^T Q with dS = P * (dP - delta), dP = dO V^T.
    Everything is computed transposed (keys on rows) so the accumulators stay in this program."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    kv_ok = (offs_n[:, None] < LK) & d_ok
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * LQ

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if IS_CAUSAL:  # query rows above the diagonal never see these keys
        lo = (tl.maximum(pid_n * BLOCK_N - (LK - LQ), 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, LQ, BLOCK_M):
        rows = start_m + offs_m
        q_ok = (rows[:, None] < LQ) & d_ok
        q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :], mask=q_ok, other=0.0)
        # Padding rows get LSE = +inf, hence P = 0: they add nothing.
        lse = tl.load(LSE + row_base + rows, mask=rows < LQ, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=rows < LQ, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        if IS_CAUSAL:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + (LK - LQ), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)

    if HAS_MASK:
        # A masked key has P = 0 in every row; its rows of dK and dV depend on nothing else, so they are
        # zeroed once here instead of masking P in every iteration.
        keep = tl.load(MASK + b * smb + offs_n * smn, mask=offs_n < LK, other=0)
        dk = tl.where(keep[:, None] != 0, dk, 0.0)
        dv = tl.where(keep[:, None] != 0, dv, 0.0)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_ok)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_ok)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, MASK,
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdqb, sdqh, sdqm, smb, smn,
                        H, LQ, LK, qk_scale, sm_scale,
                        HEAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                        EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of queries: dQ = scale * dS K, looping over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    q_ok = (offs_m[:, None] < LQ) & d_ok
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=q_ok, other=0.0)
    row_base = pid_bh.to(tl.int64) * LQ
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < LQ, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < LQ, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = LK
    if IS_CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M + LK - LQ)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < LK) & d_ok
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN_N:
            p = tl.where(cols[None, :] < LK, p, 0.0)
        if HAS_MASK:
            keep = tl.load(MASK + b * smb + cols * smn, mask=cols < LK, other=0)
            p = tl.where(keep[None, :] != 0, p, 0.0)
        if IS_CAUSAL:
            p = tl.where(cols[None, :] <= offs_m[:, None] + (LK - LQ), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd.
# ----------------------------------------------------------------------------------------------------

def _configs(block_d, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, dK/dV and dQ kernels by padded head dim
    and dtype. Chosen so that no kernel spills registers on sm_90 (checked with `bench/kernels.py
    --compile-only`, which reports registers, spill stack and shared memory): wide heads and fp32 take
    smaller tiles so that the fp32 accumulators (two (N, D) tiles in dK/dV) still fit."""
    if dtype == torch.float32:
        if block_d <= 64:
            return (64, 32, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2)
        if block_d <= 128:
            return (64, 32, 8, 2), (32, 32, 8, 1), (32, 32, 8, 1)
        return (32, 16, 8, 1), (16, 32, 8, 1), (32, 16, 8, 1)
    if block_d <= 64:
        return (128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)
    if block_d <= 128:
        return (128, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)
    return (64, 32, 8, 1), (32, 32, 8, 1), (32, 32, 8, 1)


def _dot_precision(dtype):
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by Triton for 16-bit inputs


def _rows_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(mask, q):
    if mask is None:
        return q, 0, 0  # any pointer: HAS_MASK=False never reads it
    return mask, mask.stride(0), mask.stride(1)


def _attention_fwd(q, k, v, mask, is_causal, scale):
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    block_d = block_size(d, 16)
    (bm, bn, warps, stages), _, _ = _configs(block_d, q.dtype)
    o = torch.empty_like(q)  # keeps q's memory layout, so o.transpose(1, 2).flatten(2) is free
    lse = torch.empty(bsz * heads, lq, device=q.device, dtype=torch.float32)
    m, smb, smn = _mask_args(mask, q)
    grid = (triton.cdiv(lq, bm), bsz * heads)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, m,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), smb, smn,
        heads, lq, lk, scale * math.log2(math.e),
        HEAD_D=d, IS_CAUSAL=is_causal, HAS_MASK=mask is not None, EVEN_N=lk % bn == 0,
        DOT_PREC=_dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages)
    return o, lse


def _attention_bwd(do, q, k, v, o, lse, mask, is_causal, scale):
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    block_d = block_size(d, 16)
    _, (m1, n1, warps1, stages1), (m2, n2, warps2, stages2) = _configs(block_d, q.dtype)
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(lq, 64), bsz * heads)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        heads, lq, HEAD_D=d, BLOCK_M=64, BLOCK_D=block_d)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    m, smb, smn = _mask_args(mask, q)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    common = dict(HEAD_D=d, IS_CAUSAL=is_causal, HAS_MASK=mask is not None, DOT_PREC=_dot_precision(q.dtype),
                  BLOCK_D=block_d)
    qk_scale = scale * math.log2(math.e)
    _attn_bwd_dkdv_kernel[(triton.cdiv(lk, n1), bsz * heads)](
        q, k, v, do, dk, dv, lse, delta, m, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), smb, smn,
        heads, lq, lk, qk_scale, scale, BLOCK_M=m1, BLOCK_N=n1, num_warps=warps1, num_stages=stages1, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(lq, m2), bsz * heads)](
        q, k, v, do, dq, lse, delta, m, *strides, dq.stride(0), dq.stride(1), dq.stride(2), smb, smn,
        heads, lq, lk, qk_scale, scale, EVEN_N=lk % n2 == 0, BLOCK_M=m2, BLOCK_N=n2,
        num_warps=warps2, num_stages=stages2, **common)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale):
        o, lse = _attention_fwd(q, k, v, mask, is_causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(_rows_last(do), q, k, v, o, lse, mask, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1)."""
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[2] == v.shape[2] and q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"attention: expected q (B,H,Lq,D), k/v (B,H,Lk,D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = None
    if key_padding_mask is not None:
        # bool -> uint8 is a free view; expand lets a (1, Lk) mask broadcast over the batch.
        mask = key_padding_mask.to(torch.bool).expand(q.shape[0], k.shape[2]).view(torch.uint8)
    q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
    return _Attention.apply(q, k, v, mask, bool(is_causal), scale)


def _attention_sdpa(q, k, v, key_padding_mask=None, is_causal=False, scale=None, attn_bias=None):
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
        if is_causal:
            lq, lk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            is_causal = False
    if attn_bias is not None:
        # SDPA takes one attn_mask: a float mask is added to the scores, so fold the boolean masks into
        # the bias as -inf (SDPA refuses attn_mask together with is_causal).
        if is_causal:
            lq, lk = q.shape[-2], k.shape[-2]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            is_causal = False
        bias = attn_bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def attention(q, k, v, key_padding_mask=None, is_causal=False, scale=None, attn_bias=None):
    """Public op: the Triton kernels on CUDA (or under force_triton()), else PyTorch's fused SDPA."""
    triton_ok = (attn_bias is None and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 256)
    if triton_ok and use_triton(q):
        return attention_triton(q, k, v, key_padding_mask, is_causal, scale)
    # Not attention_ref: the ref is the spec, written for reading (fp32 scores of size (Lq, Lk) in
    # memory, einsum speed, its own summation order); SDPA is PyTorch's fused op, the same one the
    # upstream models call, so CPU outputs (the shipped demo's included) keep SDPA's bits.
    return _attention_sdpa(q, k, v, key_padding_mask, is_causal, scale, attn_bias)
