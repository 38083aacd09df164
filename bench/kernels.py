"""Benchmark the Triton kernels against their PyTorch counterparts at real SD1.5 / SDXL / PixArt shapes.

    python bench/kernels.py [--dtype fp16 bf16] [--only attention group_norm layer_norm rms_norm]
    python bench/kernels.py --compile-only [--arch 90]

On a CUDA device: for each op, shape, dtype, times forward and forward+backward with
`triton.testing.do_bench` (median ms) for ours and for PyTorch (SDPA restricted to the flash backend,
or memory-efficient where flash refuses a padding mask; F.group_norm + F.silu; F.layer_norm (+ the
adaLN multiply-add); T5's RMSNorm composition) and prints the speed-up (PyTorch ms / ours ms), the
achieved TFLOP/s (attention: 4 B H Lq Lk D per forward, x3.5 for forward+backward, halved when causal)
or GB/s (norms: the minimum traffic, 2 tensor passes forward, 5 forward+backward), and the forward's
max abs difference. Without CUDA it prints one line and exits 0.

--compile-only needs no GPU: it runs the launchers on CPU tensors with the kernel launch replaced by an
ahead-of-time compile for sm_<arch> (ptxas ships with Triton) and prints each specialisation's
registers, spill stack and shared memory: a GPU-legality and register-pressure check for machines
without one. Shapes follow docs/architectures.md; batch 2 = classifier-free guidance.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ATTENTION = [  # name, B, H, Lq, Lk, D, padding mask, causal
    ("sd15 self 64x64", 2, 8, 4096, 4096, 40, False, False),
    ("sd15 cross 64x64", 2, 8, 4096, 77, 40, False, False),
    ("sd15 self 32x32", 2, 8, 1024, 1024, 80, False, False),
    ("sd15 self 16x16", 2, 8, 256, 256, 160, False, False),
    ("sdxl self 64x64", 2, 10, 4096, 4096, 64, False, False),
    ("sdxl self 32x32", 2, 20, 1024, 1024, 64, False, False),
    ("sdxl cross 64x64", 2, 10, 4096, 77, 64, False, False),
    ("pixart self 1024px", 2, 16, 4096, 4096, 72, False, False),
    ("pixart cross T5 mask", 2, 16, 4096, 120, 72, True, False),
    ("clip-l causal", 2, 12, 77, 77, 64, False, True),
]
GROUP_NORM = [  # name, shape, groups (all with the fused SiLU, as in every resnet block)
    ("sd15 unet 64x64", (2, 320, 64, 64), 32),
    ("sd15 unet 32x32", (2, 640, 32, 32), 32),
    ("sd15 unet 8x8", (2, 1280, 8, 8), 32),
    ("sdxl unet 128x128", (2, 320, 128, 128), 32),
    ("vae dec 512px", (1, 128, 512, 512), 32),
    ("vae dec 128x128", (1, 512, 128, 128), 32),
]
LAYER_NORM = [  # name, (B, L, C), modulated (PixArt adaLN, no affine) or affine LayerNorm
    ("sd15 transformer", (2, 4096, 320), False),
    ("sdxl transformer", (2, 4096, 640), False),
    ("clip-l", (2, 77, 768), False),
    ("pixart adaLN", (2, 4096, 1152), True),
]
RMS_NORM = [("t5-xxl", (2, 120, 4096))]


def _bench(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _fwd_bwd(f, inputs):
    import torch
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = f(*inputs)
    dout = torch.randn_like(out)

    def run():
        torch.autograd.grad(f(*inputs), leaves, dout)
    return run


def _row(name, dtype, mode, ours_ms, ref_ms, metric, diff=""):
    print(f"{name:24s} {dtype:5s} {mode:8s} {ours_ms:9.3f} {ref_ms:9.3f} {ref_ms / ours_ms:7.2f}x  {metric:>14s}  {diff}")


def _compare(name, dtype, ours, ref, inputs, work_fwd, work_bwd, unit):
    """Times ours and ref forward and forward+backward; `work_*` is FLOPs or bytes per call."""
    import torch
    with torch.no_grad():
        diff = f"maxdiff {(ours(*inputs).float() - ref(*inputs).float()).abs().max().item():.1e}"
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    t_o, t_r = _bench(lambda: ours(*inputs)), _bench(lambda: ref(*inputs))
    _row(name, dtype, "fwd", t_o, t_r, f"{work_fwd / t_o / 1e-3 / scale:.1f} {unit}", diff)
    t_o, t_r = _bench(_fwd_bwd(ours, inputs)), _bench(_fwd_bwd(ref, inputs))
    _row(name, dtype, "fwd+bwd", t_o, t_r, f"{work_bwd / t_o / 1e-3 / scale:.1f} {unit}")


def run_benchmarks(dtypes, only):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels
    from kernels.rms_norm import rms_norm_ref

    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}; ratio = PyTorch ms / ours ms (>1: ours faster)")
    print(f"{'case':24s} {'dtype':5s} {'mode':8s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>8s}  {'ours':>14s}")
    for dt_name in dtypes:
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt_name]
        rnd = lambda *shape: torch.randn(*shape, device=dev, dtype=dt, requires_grad=True)  # noqa: E731
        if "attention" in only:
            for name, b, h, lq, lk, d, masked, causal in ATTENTION:
                q, k, v = rnd(b, h, lq, d), rnd(b, h, lk, d), rnd(b, h, lk, d)
                mask = None
                if masked:
                    mask = torch.ones(b, lk, dtype=torch.bool, device=dev)
                    mask[0, 20:] = False  # a short caption beside a full one
                backend = SDPBackend.EFFICIENT_ATTENTION if masked else SDPBackend.FLASH_ATTENTION

                def ref(q, k, v, backend=backend, mask=mask, causal=causal):
                    with sdpa_kernel(backend):
                        m = None if mask is None else mask[:, None, None, :]
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)

                ours = lambda q, k, v, mask=mask, causal=causal: kernels.attention(q, k, v, mask, causal)  # noqa
                flops = 4 * b * h * lq * lk * d * (0.5 if causal else 1.0)
                label = name + (" (vs mem-eff)" if masked else "")
                _compare(label, dt_name, ours, ref, (q, k, v), flops, 3.5 * flops, "TFLOP/s")
        if "group_norm" in only:
            for name, shape, groups in GROUP_NORM:
                x, w, bias = rnd(*shape), rnd(shape[1]), rnd(shape[1])
                nbytes = x.numel() * x.element_size()
                _compare(name + " +silu", dt_name,
                         lambda x, w, bias, g=groups: kernels.group_norm(x, g, w, bias, 1e-5, silu=True),
                         lambda x, w, bias, g=groups: F.silu(F.group_norm(x, g, w, bias, 1e-5)),
                         (x, w, bias), 2 * nbytes, 5 * nbytes, "GB/s")
        if "layer_norm" in only:
            for name, (b, seq, c), modulated in LAYER_NORM:
                x = rnd(b, seq, c)
                nbytes = x.numel() * x.element_size()
                if modulated:
                    shift, scale = rnd(b, 1, c), rnd(b, 1, c)
                    _compare(name, dt_name,
                             lambda x, sh, sc: kernels.layer_norm_modulated(x, sh, sc, eps=1e-6),
                             lambda x, sh, sc: F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + sc) + sh,
                             (x, shift, scale), 2 * nbytes, 5 * nbytes, "GB/s")
                else:
                    w, bias = rnd(c), rnd(c)
                    _compare(name, dt_name, lambda x, w, bias: kernels.layer_norm(x, (x.shape[-1],), w, bias),
                             lambda x, w, bias: F.layer_norm(x, (x.shape[-1],), w, bias),
                             (x, w, bias), 2 * nbytes, 5 * nbytes, "GB/s")
        if "rms_norm" in only:
            for name, shape in RMS_NORM:
                x, w = rnd(*shape), rnd(shape[-1])
                nbytes = x.numel() * x.element_size()
                _compare(name, dt_name, kernels.rms_norm, rms_norm_ref, (x, w), 2 * nbytes, 5 * nbytes, "GB/s")


def compile_only(arch):
    """Ahead-of-time compile every kernel specialisation the launchers request, for sm_<arch>."""
    os.environ.pop("TRITON_INTERPRET", None)  # must happen before the kernels are defined
    import subprocess
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    seen, worst = set(), {"spills": 0}

    def aot_run(self, *args, grid, warmup, **kwargs):
        # The JIT's own binder and packer give exactly the signature/constants/attributes a GPU launch
        # would compile with; only the device query is replaced by the fixed target.
        bound, spec, opts = create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        key = (self.__name__, str(signature), str(sorted(constexprs.items())), str(options))
        if key in seen:
            return
        seen.add(key)
        compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        fields = dict(tok.split(":", 1) for line in usage.splitlines() if "REG:" in line
                      for tok in line.split() if ":" in tok)
        worst["spills"] = max(worst["spills"], int(fields.get("STACK", 0)))
        names = {self.arg_names[p[0]]: v for p, v in constexprs.items()
                 if self.arg_names[p[0]].isupper() and isinstance(v, (bool, int, str))}
        ptrs = sorted({t for t in signature.values() if t.startswith("*")})
        print(f"{self.__name__:24s} regs {fields.get('REG', '?'):>3s} stack {fields.get('STACK', '?'):>3s} "
              f"smem {compiled.metadata.shared:6d}  warps {options.num_warps} {','.join(ptrs)} {names}",
              flush=True)

    JITFunction.run = aot_run
    import kernels

    def grads(out, inputs):
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.grad(out, leaves, torch.zeros_like(out))

    with kernels.force_triton():  # CPU tensors, Triton path
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            rnd = lambda *s: torch.zeros(*s, dtype=dt, requires_grad=True)  # noqa: E731
            for d in (40, 64, 72, 80, 128, 160):
                q, k = rnd(2, 2, 64, d), rnd(2, 2, 77, d)
                grads(kernels.attention(q, k, k, torch.ones(2, 77, dtype=torch.bool)), (q, k))
                if d == 64:
                    grads(kernels.attention(q, q, q, is_causal=True), (q,))
            x, w = rnd(1, 64, 96, 96), rnd(64)  # 1024-wide tiles, rows split in two chunks
            grads(kernels.group_norm(x, 32, w, w, silu=True), (x, w))
            grads(kernels.group_norm(x[:, :, :9, :9], 4, None, None, silu=False), (x,))
            x, w, sh = rnd(2, 7, 1152), rnd(1152), rnd(2, 1, 1152)
            grads(kernels.layer_norm(x, (1152,), w, w), (x, w))
            grads(kernels.layer_norm_modulated(x, sh, sh), (x, sh))
            x = rnd(2, 7, 4096)
            grads(kernels.rms_norm(x, rnd(4096)), (x,))
    print(f"{len(seen)} specialisations compiled for sm_{arch}; largest spill stack {worst['spills']} bytes")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    p.add_argument("--only", nargs="+", default=["attention", "group_norm", "layer_norm", "rms_norm"],
                   choices=["attention", "group_norm", "layer_norm", "rms_norm"])
    p.add_argument("--compile-only", action="store_true", help="AOT-compile every kernel for --arch, no GPU")
    p.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (80, 90)")
    args = p.parse_args(argv)
    if args.compile_only:
        return compile_only(args.arch)
    import torch
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device; nothing to time (try --compile-only). Exiting.")
        return 0
    run_benchmarks(args.dtype, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
