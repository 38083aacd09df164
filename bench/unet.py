"""Benchmark: flash's SD1.5 UNet against diffusers' (the reference), fp32 on the CPU.

    python bench/unet.py [--reps 3] [--warmup 1] [--size 64] [--batch 2]

A full-size SD1.5 UNet with random weights is written once to a temporary diffusers folder (diffusers'
`save_pretrained`). Then:
- load peak RSS: each library loads the folder in its own child process (so neither pollutes the other's
  high-water mark); the child reports `ru_maxrss` after its imports, after loading, and after reading
  every weight once (safetensors maps files lazily), and the load time;
- forward: both models are loaded in this process and run on the same 64x64 latent batch of 2 (as with
  classifier-free guidance) under inference_mode, alternating which goes first, `--reps` times each after
  `--warmup` untimed runs. Prints the median wall and process-CPU seconds of each, the ratios
  flash / diffusers (target <= 1.0) and the max abs difference of the outputs (both ran one network).
It takes a few minutes and about 10 GB of memory. Not a test: run it alone.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers fills in the rest with defaults).
SD15 = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load(which, folder):
    if which == "flash":
        import weights
        return weights.load_unet(folder)
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder).eval()


def import_library(which):
    import torch  # noqa: F401
    if which == "flash":
        import weights.sd  # noqa: F401
    else:
        import diffusers  # noqa: F401


def child_write(folder):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(SD15).save_pretrained(folder)


def child_load(which, folder):
    import_library(which)
    before = peak_mb()
    t0 = time.perf_counter()
    model = load(which, folder)
    seconds = time.perf_counter() - t0
    loaded = peak_mb()
    # safetensors maps the file lazily: pages become resident when first read. Reading every weight once
    # (as the first forward would) gives the resident peak.
    n = sum(p.numel() for p in model.parameters())
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    print(json.dumps({"before_mb": before, "loaded_mb": loaded, "peak_mb": peak_mb(), "seconds": seconds,
                      "params": n, "checksum": total}))


def in_child(*args):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True, capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed forwards per library")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per library first")
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("ROLE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        role, folder = args.child
        return child_write(folder) if role == "write" else child_load(role, folder)

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; SD1.5 UNet, "
          f"latent {args.batch}x4x{args.size}x{args.size}, context {args.batch}x77x768")
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        in_child("--child", "write", folder)
        print(f"wrote random SD1.5 UNet with diffusers save_pretrained in {time.perf_counter() - t0:.0f} s")

        for which in ("flash", "diffusers"):
            r = json.loads(in_child("--child", which, folder))
            print(f"load {which:9s}: {r['seconds']:5.1f} s, {r['params']:,} params; peak RSS after imports "
                  f"{r['before_mb']:5.0f} MB, after load {r['loaded_mb']:5.0f} MB, after reading every weight "
                  f"{r['peak_mb']:5.0f} MB (load adds {r['peak_mb'] - r['before_mb']:5.0f} MB)")

        models = {"flash": load("flash", folder), "diffusers": load("diffusers", folder)}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    ctx = torch.randn(args.batch, 77, 768, generator=g)
    t = torch.full((args.batch,), 999)
    run = {"flash": lambda: models["flash"](x, t, ctx),
           "diffusers": lambda: models["diffusers"](x, t, ctx).sample}

    # Wall seconds are what a user waits; process CPU seconds are less disturbed by other jobs on the machine.
    wall, cpu, outs = {k: [] for k in run}, {k: [] for k in run}, {}
    order = list(run)
    with torch.inference_mode():
        for i in range(args.warmup + args.reps):
            for which in (order if i % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                outs[which] = run[which]()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i >= args.warmup:
                    wall[which].append(dt)
                    cpu[which].append(dc)
                print(f"  {'warmup' if i < args.warmup else 'rep'} {i}: {which:9s} {dt:6.2f} s wall, {dc:6.2f} s CPU",
                      flush=True)
    for name, times in (("wall", wall), ("CPU", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"forward median ({name}): flash {med['flash']:.2f} s, diffusers {med['diffusers']:.2f} s, "
              f"ratio flash/diffusers {med['flash'] / med['diffusers']:.3f} (target <= 1.0)")
    print(f"max abs diff of the outputs: {(outs['flash'] - outs['diffusers']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
