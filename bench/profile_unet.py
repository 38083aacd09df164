"""Where a full-size SD1.5 UNet forward's time goes on a GPU: flash with its Triton kernels, flash with
PyTorch's fused ops (`kernels.pytorch_only()`), and diffusers, holding the same random weights.

    python bench/profile_unet.py [--dtype bf16] [--batch 2] [--size 64] [--top 15]
    python bench/profile_unet.py --device cpu --tiny      # a rehearsal of the script itself

Per variant it prints:
- `ms`: the median of device-synchronised calls (triton.testing.do_bench on CUDA);
- `host ms`: the same calls issued back to back without waiting for the GPU. When it equals `ms`, the run
  is host-bound: the GPU idles while Python, the dispatcher and the kernel launches catch up;
- `graph ms`: one CUDA-graph replay of the captured forward, i.e. the GPU's own time without the host;
- `syncs`: the first call that made the host wait for the GPU inside a forward, if any
  (`torch.cuda.set_sync_debug_mode`), which would serialise host and device;
- the ops that cost the most host time (torch.profiler, self CPU), and the total device time.
bench/gpu.py's "sd15 unet forward" row gives the headline ratio; this script explains it.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from flash import unet  # noqa: E402
from flash.cli import DTYPES  # noqa: E402
from weights.save import unet_config  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=2, help="latent batch (2: one image with classifier-free guidance)")
    p.add_argument("--size", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--top", type=int, default=15, help="rows of the host-time table per variant")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same structure (rehearsal)")
    return p.parse_args()


def timed(fn, dev, reps=20):
    """(median synchronised ms, host ms per call issued back to back)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    if dev.type == "cuda":
        import triton
        med = triton.testing.do_bench(fn, warmup=50, rep=500, return_mode="median")
    else:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(runs)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e3
    sync()
    return med, host


def graph_ms(fn, reps=20):
    """The forward captured once in a CUDA graph, then replayed: the device time without host overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):      # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def first_sync(fn):
    """The first host-device synchronisation inside fn, as one line, or "none"."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def host_table(fn, dev, top):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    avg = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in avg)
    table = avg.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50)
    return table, device_us / 1e3


def main():
    args = parse_args()
    from diffusers import UNet2DConditionModel as RefUNet      # an oracle: here only, as in the tests
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = unet.CONFIGS["sd15"]
    if args.tiny:
        cfg = replace(cfg, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                      cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D",) * 2,
                      up_block_types=("CrossAttnUpBlock2D",) * 2)
    torch.manual_seed(0)
    with torch.device(dev):
        ours = unet.UNet2DConditionModel(cfg).to(dtype).eval()
        ref = RefUNet.from_config(unet_config(cfg)).to(dtype).eval()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=g).to(dev, dtype)
    ctx = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g).to(dev, dtype)
    t = torch.full((args.batch,), 999, device=dev)

    def flash_torch():
        with kernels.pytorch_only():
            return ours(x, t, ctx)
    variants = {"flash (Triton kernels)": lambda: ours(x, t, ctx), "flash (PyTorch ops)": flash_torch,
                "diffusers": lambda: ref(x, t, ctx).sample}
    print(f"SD1.5 UNet forward, latent {args.batch}x{cfg.in_channels}x{args.size}x{args.size}, {args.dtype}, "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}", flush=True)
    summary = []
    with torch.inference_mode():
        for name, fn in variants.items():
            ms, host = timed(fn, dev)
            row = {"variant": name, "ms": f"{ms:.2f}", "host ms": f"{host:.2f}"}
            if dev.type == "cuda":
                row["syncs"] = first_sync(fn)
                try:
                    row["graph ms"] = f"{graph_ms(fn):.2f}"
                except RuntimeError as e:     # a capture that fails is a finding, not a crash of the report
                    row["graph ms"] = "capture failed: " + str(e).strip().splitlines()[0][:120]
            table, device_ms = host_table(fn, dev, args.top)
            row["device ms (profiler)"] = f"{device_ms:.2f}"
            summary.append(row)
            print(f"\n=== {name}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "variant"), flush=True)
            print(table, flush=True)
    print("\n## Summary\n")
    keys = list(dict.fromkeys(k for r in summary for k in r))
    print("| " + " | ".join(keys) + " |\n" + "|---" * len(keys) + "|")
    for r in summary:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
