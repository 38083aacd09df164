"""Parity of the Triton kernels (kernels/) with their PyTorch references, forward and every gradient.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes, fp32 and fp16
(bf16 arithmetic is wrong in the interpreter); on CUDA, when present, the same cases run compiled,
bf16 included. The reference is each file's `<op>_ref` evaluated in fp64 on the same (already rounded)
inputs, differentiated by autograd. A tensor passes when
    max |ours - ref| <= atol + rtol * max |ref|
(a norm-wise bound: the gradients of weights and shifts are sums over many rows, so an element-wise
relative bound would be meaningless near their zeros).
"""
import importlib
import os

import pytest
import torch

# dtype: (atol, rtol). fp16/bf16 are dominated by the final rounding of O(1)-O(10) values and, in
# attention, by P and dS being rounded to the input dtype before their tensor-core dots.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32"), pytest.param("cpu", torch.float16, id="cpu-fp16")]
CASES += [pytest.param("cuda", dt, id=f"cuda-{name}",
                       marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
          for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))]
FP32_ONLY = [CASES[0], CASES[2]]

OPS = ("attention", "group_norm", "layer_norm", "rms_norm")
MODULES = {op: importlib.import_module(f"kernels.{op}") for op in OPS}  # `kernels.attention` is the function
from kernels import (attention, force_triton, group_norm, layer_norm, layer_norm_modulated,  # noqa: E402
                     rms_norm)


@pytest.fixture(autouse=True)
def _triton_everywhere(request):
    """Route the public ops to Triton on CPU tensors too (the interpreter runs them)."""
    params = getattr(request.node, "callspec", None)
    device = params.params.get("device") if params else None
    if device == "cpu" and not INTERPRETED:
        pytest.skip("CPU runs of the kernels need TRITON_INTERPRET=1")
    with force_triton():
        yield


def _check(ours, ref, inputs, grad_of, dtype):
    """Runs ours on `inputs` and ref in fp64 on the same values; compares output and the gradients
    w.r.t. inputs[i] for i in grad_of. Returns the max abs differences."""
    atol, rtol = TOL[dtype]
    leaves = [inputs[i].detach().requires_grad_() for i in grad_of]
    args = list(inputs)
    for i, leaf in zip(grad_of, leaves):
        args[i] = leaf
    out = ours(*args)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    args64 = [t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    for i, leaf in zip(grad_of, leaves64):
        args64[i] = leaf
    out64 = ref(*args64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())

    with torch.no_grad():
        assert out.dtype == ref(*inputs).dtype  # same output dtype as the reference in the input dtypes
    assert all(g.dtype == leaf.dtype for g, leaf in zip(grads, leaves))
    errs = []
    for name, a, b in [("out", out, out64)] + [(f"grad[{i}]", g, g64) for i, g, g64 in zip(grad_of, grads, grads64)]:
        assert a.shape == b.shape, name
        err = (a.double() - b).abs().max().item()
        bound = atol + rtol * b.abs().max().item()
        assert err <= bound, f"{name}: max abs diff {err:.3g} > {bound:.3g}"
        errs.append(err)
    return errs


def _rand(*shape, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype)


# ------------------------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("d,lk", [(40, 77), (64, 120), (72, 77), (80, 120), (128, 77), (160, 120)])
def test_attention_head_dims(device, dtype, d, lk):
    """Cross-attention: every head dim of SD1.5/SDXL/PixArt/CLIP, ragged key lengths (77, 120)."""
    q, k, v = (_rand(1, 2, n, d, device=device, dtype=dtype) for n in (16, lk, lk))
    _check(attention, MODULES["attention"].attention_ref, (q, k, v), (0, 1, 2), dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("lq,lk,d,masked,causal", [
    (24, 120, 64, True, False),   # PixArt: T5 caption padding mask
    (77, 77, 64, False, True),    # CLIP: causal self-attention
    (20, 77, 40, True, True),     # causal with Lq < Lk (tril offset) and a mask
    (130, 77, 40, False, False),  # several query blocks, the last one ragged
])
def test_attention_mask_causal(device, dtype, lq, lk, d, masked, causal):
    q, k, v = (_rand(2, 1, n, d, device=device, dtype=dtype) for n in (lq, lk, lk))
    mask = None
    if masked:
        lengths = torch.tensor([lk // 3, lk - 5], device=device)
        mask = torch.arange(lk, device=device)[None] < lengths[:, None]
    ours = lambda q, k, v: attention(q, k, v, key_padding_mask=mask, is_causal=causal)  # noqa: E731
    ref = lambda q, k, v: MODULES["attention"].attention_ref(q, k, v, mask, causal)  # noqa: E731
    _check(ours, ref, (q, k, v), (0, 1, 2), dtype)


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
def test_attention_scale_and_layout(device, dtype):
    """An explicit scale; q/k/v as the models pass them: (B, L, H, D) views transposed to (B, H, L, D)."""
    q, k, v = (_rand(2, n, 3, 40, device=device, dtype=dtype).transpose(1, 2) for n in (33, 50, 50))
    assert not q.is_contiguous()
    ours = lambda q, k, v: attention(q, k, v, scale=0.3)  # noqa: E731
    ref = lambda q, k, v: MODULES["attention"].attention_ref(q, k, v, scale=0.3)  # noqa: E731
    _check(ours, ref, (q, k, v), (0, 1, 2), dtype)
    out = attention(q, k, v)
    assert out.stride() == q.stride()  # output keeps the (B, L, H, D) memory layout: no copy to merge heads


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
def test_attention_rows_without_keys(device, dtype):
    """Causal with Lq > Lk: the first Lq - Lk rows see no key. Documented: zeros, zero gradients."""
    q, k, v = (_rand(1, 1, n, 64, device=device, dtype=dtype).requires_grad_() for n in (40, 16, 16))
    out = attention(q, k, v, is_causal=True)
    out.sum().backward()
    assert torch.all(out[:, :, :24] == 0) and torch.all(q.grad[:, :, :24] == 0)
    ref = MODULES["attention"].attention_ref(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out[:, :, 24:].double(), ref[:, :, 24:], atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_dispatch(monkeypatch):
    """CPU tensors take PyTorch unless under force_triton(); a bias always takes PyTorch."""
    attn = MODULES["attention"]
    q = torch.randn(1, 2, 8, 16)
    calls = []
    monkeypatch.setattr(attn, "attention_triton", lambda *a, **k: calls.append(1) or attn.attention_ref(*a, **k))
    attention(q, q, q)
    assert calls == [1]
    attention(q, q, q, attn_bias=torch.zeros(1, 2, 8, 8))
    assert calls == [1]
    with force_triton(False):
        out = attention(q, q, q)
        assert calls == [1]
        torch.testing.assert_close(out, attn.attention_ref(q, q, q))
        gn = MODULES["group_norm"]
        monkeypatch.setattr(gn, "group_norm_triton", None)  # would raise if called
        x = torch.randn(1, 8, 3, 3)
        torch.testing.assert_close(group_norm(x, 4, silu=True), gn.group_norm_ref(x, 4, silu=True))
        ln, rms = MODULES["layer_norm"], MODULES["rms_norm"]
        for mod, name in ((ln, "_LayerNorm"), (rms, "_RMSNorm")):
            monkeypatch.setattr(mod, name, None)
        x, s = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
        torch.testing.assert_close(layer_norm(x, (8,)), ln.layer_norm_ref(x, (8,)))
        torch.testing.assert_close(layer_norm_modulated(x, s, s), ln.layer_norm_modulated_ref(x, s, s))
        torch.testing.assert_close(rms_norm(x, s[0, 0]), rms.rms_norm_ref(x, s[0, 0]))
    attention(q, q, q)
    assert calls == [1, 1]  # the fixture's force_triton() holds again after the nested block


def test_cpu_fallbacks_are_the_refs_in_fp32():
    """The norms' CPU paths (PyTorch's ops in x's dtype, see their comments) give their references'
    exact bits on fp32 inputs, the dtype of CPU runs (the shipped demo's included)."""
    gn, ln, rms = MODULES["group_norm"], MODULES["layer_norm"], MODULES["rms_norm"]
    rand = lambda *shape, scale=1.0, shift=0.0: _rand(*shape, device="cpu", dtype=torch.float32,  # noqa: E731
                                                      scale=scale, shift=shift)
    x4, x3 = rand(2, 64, 9, 11, scale=3.0, shift=1.0), rand(2, 7, 64, scale=2.0, shift=0.5)
    w, b = rand(64, shift=1.0), rand(64)
    with force_triton(False):
        for wb in ((w, b), (None, None)):
            for silu in (False, True):
                assert torch.equal(group_norm(x4, 32, *wb, silu=silu), gn.group_norm_ref(x4, 32, *wb, silu=silu))
            assert torch.equal(layer_norm(x3, (64,), *wb), ln.layer_norm_ref(x3, (64,), *wb))
            for mod_shape in ((2, 1, 64), (1, 1, 64), (64,)):
                sh, sc = rand(*mod_shape, scale=0.5), rand(*mod_shape, scale=0.5)
                assert torch.equal(layer_norm_modulated(x3, sh, sc, *wb), ln.layer_norm_modulated_ref(x3, sh, sc, *wb))
        assert torch.equal(rms_norm(x3, w), rms.rms_norm_ref(x3, w))


# ----------------------------------------------------------------------------------------------- group norm

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape,groups,silu,affine", [
    ((1, 64, 5, 7), 32, False, True),    # UNet-like: 32 groups of 2 channels, odd spatial size
    ((1, 64, 5, 7), 32, True, True),     # ... with the fused SiLU
    ((2, 8, 9, 11), 4, True, True),      # 4 groups, batch 2
    ((1, 8, 96, 97), 4, True, False),    # rows longer than one chunk (split statistics), no affine
    ((2, 32, 13), 32, False, True),      # (N, C, L) input, one channel per group
])
def test_group_norm(device, dtype, shape, groups, silu, affine):
    if shape[-1] == 97 and dtype == torch.float16 and device == "cpu":
        pytest.skip("one dtype is enough for the long-row case on the interpreter")
    x = _rand(*shape, device=device, dtype=dtype, scale=3.0, shift=1.0)
    c = shape[1]
    w = _rand(c, device=device, dtype=dtype, scale=0.5, shift=1.0) if affine else None
    b = _rand(c, device=device, dtype=dtype) if affine else None
    ours = lambda x, w, b: group_norm(x, groups, w, b, 1e-5, silu=silu)  # noqa: E731
    ref = lambda x, w, b: MODULES["group_norm"].group_norm_ref(x, groups, w, b, 1e-5, silu=silu)  # noqa: E731
    _check(ours, ref, (x, w, b), (0, 1, 2) if affine else (0,), dtype)


# ----------------------------------------------------------------------------------------------- layer norm

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(device, dtype, affine):
    x = _rand(2, 7, 48, device=device, dtype=dtype, scale=2.0, shift=0.5)
    w = _rand(48, device=device, dtype=dtype, shift=1.0) if affine else None
    b = _rand(48, device=device, dtype=dtype) if affine else None
    ours = lambda x, w, b: layer_norm(x, (48,), w, b, 1e-5)  # noqa: E731
    ref = lambda x, w, b: MODULES["layer_norm"].layer_norm_ref(x, (48,), w, b, 1e-5)  # noqa: E731
    _check(ours, ref, (x, w, b), (0, 1, 2) if affine else (0,), dtype)


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
def test_layer_norm_2d_shape(device, dtype):
    x, w = _rand(3, 5, 4, 6, device=device, dtype=dtype), _rand(4, 6, device=device, dtype=dtype)
    ours = lambda x, w: layer_norm(x, (4, 6), w, None)  # noqa: E731
    ref = lambda x, w: MODULES["layer_norm"].layer_norm_ref(x, (4, 6), w, None)  # noqa: E731
    _check(ours, ref, (x, w), (0, 1), dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("mod_shape,affine", [((2, 1, 40), False), ((2, 1, 40), True), ((1, 1, 40), True),
                                               ((40,), False)])
def test_layer_norm_modulated(device, dtype, mod_shape, affine):
    """PixArt's adaLN: norm(x) * (1 + scale) + shift, gradients for x, shift, scale, weight, bias."""
    x = _rand(2, 9, 40, device=device, dtype=dtype, scale=2.0)
    shift, scale = (_rand(*mod_shape, device=device, dtype=dtype, scale=0.5) for _ in range(2))
    w = _rand(40, device=device, dtype=dtype, shift=1.0) if affine else None
    b = _rand(40, device=device, dtype=dtype) if affine else None
    ref = MODULES["layer_norm"].layer_norm_modulated_ref
    _check(layer_norm_modulated, ref, (x, shift, scale, w, b), (0, 1, 2, 3, 4) if affine else (0, 1, 2), dtype)


# ------------------------------------------------------------------------------------------------- RMS norm

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_rms_norm(device, dtype, weight_fp32):
    x = _rand(2, 5, 40, device=device, dtype=dtype, scale=2.0)
    w = _rand(40, device=device, dtype=torch.float32 if weight_fp32 else dtype, shift=1.0)
    ref = MODULES["rms_norm"].rms_norm_ref
    _check(rms_norm, ref, (x, w), (0, 1), dtype)
    if not weight_fp32 and dtype != torch.float32:  # T5's cast-then-multiply, reproduced bit for bit
        assert torch.equal(rms_norm(x, w), ref(x, w))
