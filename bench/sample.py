"""Benchmark: one few-step image on the CPU, flash against diffusers (issue 14's figures).

    python bench/sample.py                          # SD1.5 512x512, 4 steps, no CFG, median of 3
    python bench/sample.py --reps 1 --runs flash,diffusers-bf16      # a short run
    python bench/sample.py --families sd15,sdxl     # also SDXL at 1024x1024 (slow: ~10 GB, minutes per image)
    python bench/sample.py --whole-process          # also sample.py vs a diffusers script, as processes

A full-size pipeline with random weights (real configs, the real CLIP vocabulary in weights/clip_vocab) is
written once to a diffusers folder under --work (kept, so later runs skip it): SD1.5 in fp32, as released;
SDXL in bf16 (its fp32 UNet alone is 10 GB) with a random TAESD beside it.

In process: each run is a child process (so peak RSS is its own, and only one full-size model is in
memory) that loads the folder, makes one untimed image (oneDNN builds its kernels on first use), then times
one image: text encoding, each UNet call, the VAE decode and the total (timers wrap the modules' forward),
and reports ru_maxrss. Runs, alternating order over --reps:
- flash: sample.py's path with its defaults (flash.cpu: bf16 on CPUs with bf16 matrix units, else fp32),
  and the same with --tiny-vae (a random TAESD: the decode time is the point, not the picture);
- diffusers: StableDiffusionPipeline with its defaults (fp32), and with torch_dtype=bfloat16; both with
  LCMScheduler, the few-step scheduler a Flash LoRA runs with in diffusers (4 UNet calls, as flash's).
The flash run also counts the UNet's FLOPs (torch.utils.flop_counter) and times a 4096^3 bf16 matmul in
the same process: the fraction of that GEMM throughput the UNet forward reaches.
--whole-process: `python sample.py --model FOLDER --steps 4 --height 512 --width 512` against the same job
as a plain diffusers script (from_pretrained, LCMScheduler, 4 steps, guidance 0, PNG), wall time of each
process, alternating, median of --reps. Not a test; run it alone on a quiet machine.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"
SIZES = {"sd15": 512, "sdxl": 1024}
RUNS = ("flash", "flash-tiny-vae", "diffusers-fp32", "diffusers-bf16")
DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import LCMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe(sys.argv[2], num_inference_steps=4, guidance_scale=0.0, height=512, width=512,
     generator=torch.Generator().manual_seed(0)).images[0].save(sys.argv[3])
"""


def write_pipeline(family, folder):
    """A full-size random pipeline (+ a random TAESD in folder/taesd) saved as diffusers folders."""
    from flash import clip, unet, vae
    from flash.io import write_json, write_safetensors
    from flash.pipeline import Pipeline
    from flash.taesd import AutoencoderTiny, TinyVAEConfig
    from flash.tokenizer import clip_tokenizer, read_clip_vocab
    from weights.save import save_pipeline
    vocab = read_clip_vocab(ROOT / "weights/clip_vocab/vocab.json", ROOT / "weights/clip_vocab/merges.txt")
    dtype = torch.float32 if family == "sd15" else torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)              # built (and initialised) in the stored dtype: half the memory
    try:
        names = ["clip-l"] + (["openclip-bigg"] if family == "sdxl" else [])
        encoders = [clip.CLIPTextModel(clip.CONFIGS[n]) for n in names]
        for e in encoders:     # CLIP's embedding scale (PyTorch's N(0, 1) would swamp every layer)
            torch.nn.init.normal_(e.text_model.embeddings.token_embedding.weight, std=0.02)
            torch.nn.init.normal_(e.text_model.embeddings.position_embedding.weight, std=0.01)
        tokenizers = [clip_tokenizer(*vocab), clip_tokenizer(*vocab, pad_token="!")][:len(names)]  # SDXL's 2nd: "!"
        pipe = Pipeline(family=family, vae=vae.AutoencoderKL(vae.CONFIGS["sdxl" if family == "sdxl" else "sd"]),
                        text_encoders=encoders, tokenizers=tokenizers,
                        unet=unet.UNet2DConditionModel(unet.CONFIGS[family]),
                        config={"force_zeros_for_empty_prompt": family == "sdxl"})
        save_pipeline(pipe, folder)
        del pipe
        tiny = AutoencoderTiny(TinyVAEConfig())
    finally:
        torch.set_default_dtype(default)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(tiny.config).items()}
    write_safetensors({k: v.contiguous() for k, v in tiny.state_dict().items()},
                      Path(folder) / "taesd" / "diffusion_pytorch_model.safetensors")
    write_json({"_class_name": "AutoencoderTiny", "act_fn": "relu", **cfg}, Path(folder) / "taesd" / "config.json")
    (Path(folder) / "done").write_text("ok")


# ------------------------------------------------------------------------------------- one run (child)

class Timers:
    """Wall seconds of every call of the wrapped methods, by name."""

    def __init__(self):
        self.times = {}

    def wrap(self, obj, attr, name):
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.times.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        setattr(obj, attr, timed)


def load_run(run, folder, family):
    """-> (make_image(), Timers) for one run."""
    timers = Timers()
    if run.startswith("flash"):
        from flash.cli import DTYPES, dtype_name
        from flash.pipeline import generate
        from weights import load_pipeline_with_loras, load_tiny_vae
        dtype = DTYPES[dtype_name(None, "cpu")]          # sample.py's default here
        pipe = load_pipeline_with_loras(folder, dtype, "cpu")
        if run == "flash-tiny-vae":
            pipe.use_tiny_vae(load_tiny_vae(Path(folder) / "taesd", dtype))
        for enc in pipe.text_encoders:
            timers.wrap(enc, "forward", "text")
        timers.wrap(pipe.unet, "forward", "unet")
        timers.wrap(pipe.vae, "decode", "vae")
        size = SIZES[family]
        return (lambda: generate(pipe, [PROMPT], steps=4, sampler="flash", guidance=0, height=size, width=size,
                                 progress=False)), timers, pipe
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    dtype = torch.bfloat16 if run == "diffusers-bf16" else None
    pipe = cls.from_pretrained(folder, dtype=dtype) if dtype else cls.from_pretrained(folder)   # diffusers >= 0.36
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            timers.wrap(enc, "forward", "text")
    timers.wrap(pipe.unet, "forward", "unet")
    timers.wrap(pipe.vae, "decode", "vae")
    size = SIZES[family]
    return (lambda: pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, height=size, width=size,
                         generator=torch.Generator().manual_seed(0), output_type="pt").images), timers, pipe.unet


def gemm_fraction(pipe, family, unet_s):
    """UNet FLOPs (one call, batch 1) / its measured time, against a timed 4096^3 matmul in the UNet's dtype."""
    from torch.utils.flop_counter import FlopCounterMode
    u = pipe.unet
    side = SIZES[family] // 8
    x = torch.randn(1, 4, side, side, dtype=pipe.dtype)
    ctx = torch.randn(1, 77, u.config.cross_attention_dim, dtype=pipe.dtype)
    kw = {}
    if family == "sdxl":
        kw = {"added_cond": {"text_embeds": torch.randn(1, 1280, dtype=pipe.dtype),
                             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], dtype=pipe.dtype)}}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        u(x, torch.tensor([999]), ctx, **kw)
    flops = counter.get_total_flops()
    a, b = torch.randn(4096, 4096, dtype=pipe.dtype), torch.randn(4096, 4096, dtype=pipe.dtype)
    with torch.inference_mode():
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        gemm = 3 * 2 * 4096 ** 3 / (time.perf_counter() - t0)
    unet = flops / unet_s
    return {"unet_gflop": round(flops / 1e9, 3), "unet_gflops_per_s": round(unet / 1e9, 1),
            "gemm_gflops_per_s": round(gemm / 1e9, 1), "fraction_of_gemm": round(unet / gemm, 3)}


def child(run, folder, family):
    t0 = time.perf_counter()
    make, timers, pipe = load_run(run, folder, family)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        make()                                   # warm-up: oneDNN creates its primitives on first use
        timers.times.clear()
        t0 = time.perf_counter()
        make()
        total = time.perf_counter() - t0
    out = {"run": run, "load_s": load_s, "total_s": total, "text_s": sum(timers.times.get("text", [])),
           "unet_s": list(timers.times.get("unet", [])), "vae_s": sum(timers.times.get("vae", [])),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "dtype": str(pipe.dtype).replace("torch.", "") if pipe is not None else None}
    if run == "flash":
        out.update(gemm_fraction(pipe, family, statistics.median(out["unet_s"])))
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------------------------------------- parent

def spawn(args_list, timeout=3600):
    proc = subprocess.run([sys.executable, *args_list], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(args_list[:3])} failed:\n{proc.stderr[-3000:]}")


def alternating(names, reps):
    """rep r runs the names rotated by r: every name runs first, middle and last in turn."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(reps)]


def in_process(family, folder, runs, reps):
    results = {r: [] for r in runs}
    for order in alternating(runs, reps):
        for run in order:
            res = spawn([__file__, "--child", run, "--folder", str(folder), "--families", family])
            results[run].append(res)
            print(f"  {family} {run}: {res['total_s']:.2f} s", file=sys.stderr, flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows = {}
    for run, rs in results.items():
        row = {k: round(med([r[k] for r in rs]), 3) for k in ("load_s", "text_s", "vae_s", "total_s", "peak_rss_gb")}
        calls = [r["unet_s"] for r in rs]
        row["unet_calls_s"] = [round(med(c), 3) for c in zip(*calls)]
        row["dtype"] = rs[0]["dtype"]
        for k in ("unet_gflop", "unet_gflops_per_s", "gemm_gflops_per_s", "fraction_of_gemm"):
            if k in rs[0]:
                row[k] = round(med([r[k] for r in rs]), 3)
        rows[run] = row
    return rows


def whole_process(folder, reps, work):
    cmds = {"sample.py (defaults)": ["sample.py", "--model", str(folder), "--steps", "4", "--height", "512",
                                     "--width", "512", "--prompt", PROMPT, "--out", str(work / "flash.png")],
            "diffusers (defaults, fp32)": ["-c", DIFFUSERS_SCRIPT, str(folder), PROMPT, str(work / "diffusers.png")]}
    times = {k: [] for k in cmds}
    for order in alternating(list(cmds), reps):
        for name in order:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, *cmds[name]], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
            times[name].append(time.perf_counter() - t0)
            print(f"  whole process {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    out = {k: round(statistics.median(v), 2) for k, v in times.items()}
    out["ratio sample.py / diffusers"] = round(out["sample.py (defaults)"] / out["diffusers (defaults, fp32)"], 3)
    out["commands"] = {"sample.py": "python " + " ".join(cmds["sample.py (defaults)"]),
                       "diffusers": f"python -c DIFFUSERS_SCRIPT {folder} ... (bench/sample.py)"}
    return out


def report(family, rows):
    print(f"\n{family} {SIZES[family]}x{SIZES[family]}, 4 steps, no CFG; median of the reps (seconds)")
    print(f"{'run':<16} {'dtype':<9} {'load':>6} {'text':>6} {'UNet calls':<28} {'VAE':>6} {'total':>7} "
          f"{'peak RSS GB':>11}")
    for run, r in rows.items():
        calls = " ".join(f"{c:.2f}" for c in r["unet_calls_s"])
        print(f"{run:<16} {str(r['dtype']):<9} {r['load_s']:>6.2f} {r['text_s']:>6.3f} {calls:<28} {r['vae_s']:>6.2f} "
              f"{r['total_s']:>7.2f} {r['peak_rss_gb']:>11.2f}")
    ref = {k: rows[k]["total_s"] for k in ("diffusers-fp32", "diffusers-bf16") if k in rows}
    for run in ("flash", "flash-tiny-vae"):
        for k, v in ref.items():
            if run in rows:
                target = "  (target <= 0.9)" if (run, k) == ("flash", "diffusers-bf16") else ""
                print(f"{run} / {k}: {rows[run]['total_s'] / v:.3f}{target}")
    if "flash" in rows and "fraction_of_gemm" in rows["flash"]:
        r = rows["flash"]
        print(f"UNet forward: {r['unet_gflop']} GFLOP per call, {r['unet_gflops_per_s']} GFLOP/s = "
              f"{r['fraction_of_gemm']:.0%} of a 4096^3 {r['dtype']} matmul's {r['gemm_gflops_per_s']} GFLOP/s "
              f"(target >= 40%)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="runs of each configuration, alternating (default: 3)")
    p.add_argument("--families", default="sd15", help="comma-separated: sd15, sdxl (default: sd15)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--whole-process", action="store_true", help="also time sample.py and a diffusers script "
                                                                "as whole processes (SD1.5)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "flash-bench-sample"),
                   help="where the random pipelines are written and kept (default: %(default)s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.folder, args.families)
    work = Path(args.work)
    families = args.families.split(",")
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS] + [f for f in families if f not in SIZES]
    if unknown:
        p.error(f"unknown run or family: {', '.join(unknown)}")
    from flash.cpu import native_bf16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}")
    for family in families:
        folder = work / family
        if not (folder / "done").is_file():
            print(f"writing a random {family} pipeline to {folder} ...", file=sys.stderr, flush=True)
            write_pipeline(family, folder)
        # SDXL in fp32 needs ~13 GB for diffusers alone: only the bf16 runs
        fam_runs = [r for r in runs if family == "sd15" or r != "diffusers-fp32"]
        report(family, in_process(family, folder, fam_runs, args.reps))
    if args.whole_process:
        folder = work / "sd15"
        if not (folder / "done").is_file():
            write_pipeline("sd15", folder)
        print("\nwhole process, SD1.5 512x512, 4 steps (seconds, median):")
        print(json.dumps(whole_process(folder, args.reps, work), indent=2))


if __name__ == "__main__":
    sys.exit(main())
