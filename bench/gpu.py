"""The GPU proof: one command that runs and measures every CUDA path of flash in about 8 minutes on an H100/H200.

    python bench/gpu.py [--budget 480] [--out bench/results] [--only tests kernels models]
    python bench/gpu.py --dry-run [--out DIR]      # CPU, tiny sizes, Triton interpreter (CI runs this)

Sections, in this order; results are written after every figure, so a run cut off still leaves them:
1. tests:   pytest as a subprocess with TRITON_INTERPRET off: tests/test_kernels.py's CUDA cases (fp32,
            fp16, bf16, compiled) and tests/test_device_parity.py (SD1.5-, SDXL-, PixArt-like tiny models
            against diffusers, fp32 and bf16); pass / fail / skip counts and the failing test ids.
2. kernels: forward and forward+backward time of each Triton kernel against PyTorch at the real models'
            shapes (attention against SDPA's flash backend; GroupNorm+SiLU, adaLN LayerNorm, RMSNorm against
            their PyTorch compositions), as ratio = PyTorch ms / ours ms (> 1: ours faster).
3. models:  full-size random weights in bf16: the SD1.5 UNet forward at 512 px against diffusers'; the
            sample.py path (load_pipeline_with_loras + generate) for one 4-step image at 512 (SD1.5) and 1024
            (SDXL), and sample.py itself end to end; one Flash training step (SD1.5 512 px batch 4, SDXL
            1024 px batch 1, LoRA at the paper's rank) with and without gradient checkpointing, against the
            reference's two-copy design (tests/train_bench.py): seconds per step and peak CUDA memory.
4. results: bench/results/gpu-<device>-<date>.{json,md}: every figure, the versions, the device.

--budget caps the run: each section gets a share plus what the ones before left; a piece that would start
without enough time is recorded as skipped. --dry-run: the same code paths on the CPU, tiny shapes and
models, fp32, the kernels interpreted; results in --out or a temporary folder. docs/gpu.md: the figures.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Set before torch, triton or kernels/ is imported: Triton reads TRITON_INTERPRET when a kernel is defined. The
# subprocesses (pytest, sample.py, train.py) get the same environment.
DRY_RUN = "--dry-run" in sys.argv[1:]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           TRITON_INTERPRET="1" if DRY_RUN else "0")
if DRY_RUN:      # one thread per process: on a busy CI machine, spinning OpenMP threads cost 100x
    ENV.update(FLASH_PARITY_DEVICE="cpu", OMP_NUM_THREADS="1")
os.environ.update(ENV)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import kernels  # noqa: E402
from flash import clip, unet, vae  # noqa: E402
from flash.pipeline import Pipeline, generate  # noqa: E402
from flash.tokenizer import clip_tokenizer, read_clip_vocab  # noqa: E402
from kernels.rms_norm import rms_norm_ref  # noqa: E402
from weights import load_pipeline_with_loras  # noqa: E402
from weights.save import save_pipeline, unet_config  # noqa: E402

SHARES = {"tests": 0.3, "kernels": 0.15, "models": 0.55}     # of --budget; unused time passes on

# name, B, H, Lq, Lk, D (docs/architectures.md; batch 2 = classifier-free guidance)
ATTENTION = [("sd15 self 64x64", 2, 8, 4096, 4096, 40), ("sd15 self 32x32", 2, 8, 1024, 1024, 80),
             ("sd15 cross 64x64", 2, 8, 4096, 77, 40), ("sdxl self 64x64", 2, 10, 4096, 4096, 64),
             ("sdxl self 32x32", 2, 20, 1024, 1024, 64), ("pixart self 1024px", 2, 16, 4096, 4096, 72)]
GROUP_NORM = [("sd15 64x64", (2, 320, 64, 64)), ("sd15 32x32", (2, 640, 32, 32)), ("sdxl 128x128", (2, 320, 128, 128))]
LAYER_NORM = [("pixart adaLN", (2, 4096, 1152))]
RMS_NORM = [("t5-xxl", (2, 120, 4096))]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreted kernels (for CI)")
    p.add_argument("--out", help="results folder (default: bench/results; with --dry-run a temporary folder)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: 480; --dry-run 600)")
    p.add_argument("--only", nargs="+", choices=list(SHARES), default=list(SHARES), help="sections to run")
    p.add_argument("--work", help="folder for the random pipelines and training runs (default: a temporary one)")
    return p.parse_args()


class Results:
    """Every figure, written to NAME.json and NAME.md after each one."""

    def __init__(self, folder, name, meta):
        self.base = Path(folder) / name
        self.base.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "tests": {}, "kernels": [], "models": {}, "targets": []}
        self.save()

    def save(self):
        self.base.with_suffix(".json").write_text(json.dumps(self.data, indent=1))
        self.base.with_suffix(".md").write_text(render(self.data))

    def add(self, section, key, value):
        self.data[section].append(value) if key is None else self.data[section].update({key: value})
        self.save()


def render(data):
    """The results as a Markdown page."""
    m = data["meta"]
    dry = " -- DRY RUN on the CPU: these figures mean nothing" if m["dry_run"] else ""
    lines = [f"# flash GPU proof: {m['device']} ({m['date']}){dry}", "",
             " | ".join(f"{k} {m[k]}" for k in ("torch", "triton", "cuda", "driver", "python")), ""]
    if data["targets"]:
        lines += ["## Targets", "", "| target | figure | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else 'NO'} |" for t in data["targets"]] + [""]
    if data["tests"]:
        lines += ["## CUDA tests", "", "| suite | passed | failed | errors | skipped | seconds |", "|---" * 6 + "|"]
        for k, r in data["tests"].items():
            lines.append(f"| {k} | {r.get('passed')} | {r.get('failed')} | {r.get('errors')} | {r.get('skipped')} "
                         f"| {r.get('seconds', 0):.0f} |")
            lines += [f"- FAILED {name}" for name in r.get("failures", [])]
        lines.append("")
    if data["kernels"]:
        lines += ["## Kernels (ratio = PyTorch ms / ours ms; > 1: ours faster)", "",
                  "| op | case | dtype | mode | ours ms | torch ms | ratio | max abs diff |", "|---" * 8 + "|"]
        lines += [f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['ours_ms']:.3f} | "
                  f"{r['torch_ms']:.3f} | {r['ratio']:.2f} | {r['maxdiff']} |" for r in data["kernels"]] + [""]
    lines += ["## Models", ""] if data["models"] else []
    lines += [f"- **{k}**: " + ", ".join(f"{a} {b}" for a, b in v.items()) for k, v in data["models"].items()]
    lines += ["", "## Sections that failed", ""] if data.get("errors") else []
    lines += [f"- {k}: {v}" for k, v in data.get("errors", {}).items()]
    return "\n".join(lines) + "\n"


class Clock:
    """The run's budget: each section's deadline is its share (of the sections run) plus whatever the
    sections before it left."""

    def __init__(self, budget, sections):
        self.budget, self.start, self.deadline = budget, time.monotonic(), time.monotonic()
        self.shares = {s: SHARES[s] / sum(SHARES[t] for t in sections) for s in sections}

    def open(self, section):
        self.deadline = max(self.deadline, time.monotonic()) + self.shares[section] * self.budget

    def left(self):
        return self.deadline - time.monotonic()


def timer(dev, rep_ms=40):
    """-> bench(fn) in milliseconds: triton's do_bench on CUDA (warmed up, L2 flushed, the median of the runs
    that fit in rep_ms); on the CPU (a dry run, where the figures mean nothing) one wall-clock run."""
    if dev == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=rep_ms // 4, rep=rep_ms, return_mode="median")

    def bench(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return bench


# ------------------------------------------------------------------------------------------------- 1. tests

def section_tests(args, res, clock, env):
    """pytest on the CUDA cases (the short suite first); on a dry run a few CPU cases of the same files."""
    suites = {"model parity": ["tests/test_device_parity.py"], "kernels": ["tests/test_kernels.py", "-k", "cuda"]}
    if args.dry_run:
        suites["kernels"] = ["tests/test_kernels.py", "-k", "cpu-fp32 and (rms_norm or layer_norm_modulated)"]
    for name, selection in suites.items():
        if clock.left() < 10:
            res.add("tests", name, {"skipped_for_budget": True})
            continue
        xml = Path(tempfile.mkstemp(suffix=".xml")[1])
        t0 = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}",
                                  *parallel(args), *selection], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=clock.left()).stdout
            counts = junit_counts(xml)
        except subprocess.TimeoutExpired as e:    # no report: count the verdicts pytest printed before the cut
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            counts = {**verbose_counts(out), "timed_out": True}
        res.add("tests", name, {**counts, "seconds": time.monotonic() - t0, "tail": out.strip()[-600:]})
        print(f"  tests {name}: {res.data['tests'][name]}"[:200], flush=True)


def parallel(args):
    """pytest-xdist's workers when it is installed (not a project dependency): compiling the kernel cases'
    Triton specialisations dominates the kernel suite (72 cases: 84 s for the first 25 one at a time on an
    H200 host, all 72 in 30 s on 12 workers), and compiling is CPU work that spreads over the host's cores."""
    if args.dry_run or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(max(1, min(12, (os.cpu_count() or 2) - 2)))]


def verbose_counts(out):
    """Counts from `pytest -v` lines: "path::test[id] PASSED  [ 3%]", or under xdist
    "[gw0] [  3%] PASSED path::test[id]"."""
    words = ("PASSED", "FAILED", "ERROR", "SKIPPED")
    verdicts = []
    for line in out.splitlines():
        test = next((w for w in line.split() if "::" in w), None)
        verdict = next((w for w in line.split() if w in words), None)
        if test and verdict:
            verdicts.append((test, verdict))
    n = {v: sum(w == v for _, w in verdicts) for v in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"passed": n["PASSED"], "failed": n["FAILED"], "errors": n["ERROR"], "skipped": n["SKIPPED"],
            "failures": [t for t, w in verdicts if w in ("FAILED", "ERROR")]}


def junit_counts(xml):
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError):
        return {"passed": None, "failed": None, "errors": None, "skipped": None, "failures": ["no report"]}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"], "failures": failed}


# ----------------------------------------------------------------------------------------------- 2. kernels

def section_kernels(args, res, clock, dev):
    dry, bench = args.dry_run, timer(dev)
    dtypes = [torch.float32] if dry else [torch.bfloat16, torch.float16]
    shrink = (lambda n: max(8, n // 64)) if dry else (lambda n: n)       # sequence lengths
    side = (lambda n: n // 16) if dry else (lambda n: n)                  # image sides
    width = (lambda c: 64) if dry else (lambda c: c)                      # GroupNorm channels (32 groups)

    def compare(op, case, dt, ours, ref, inputs):
        try:
            if clock.left() > 2:
                timings(op, case, dt, ours, ref, inputs)
        except Exception as e:        # e.g. a kernel that fails to compile: recorded, the other cases still run
            res.data.setdefault("errors", {})[f"kernels {op} {case} {dt}"] = f"{type(e).__name__}: {e}"[:400]

    def timings(op, case, dt, ours, ref, inputs):
        with torch.no_grad():
            diff = (ours(*inputs).float() - ref(*inputs).float()).abs().max().item()
        leaves = [t for t in inputs if t.requires_grad]
        dout = torch.randn_like(ours(*inputs))
        for mode, wrap in (("fwd", lambda f: lambda: f(*inputs)),
                           ("fwd+bwd", lambda f: lambda: torch.autograd.grad(f(*inputs), leaves, dout))):
            t_ours, t_ref = bench(wrap(ours)), bench(wrap(ref))
            res.add("kernels", None, {"op": op, "case": case, "dtype": str(dt).split(".")[-1], "mode": mode,
                                      "ours_ms": t_ours, "torch_ms": t_ref, "ratio": t_ref / t_ours,
                                      "maxdiff": f"{diff:.1e}"})
        print(f"  kernels {op} {case} {dt}: fwd+bwd ratio {res.data['kernels'][-1]['ratio']:.2f}", flush=True)

    with kernels.force_triton(dry):          # CUDA tensors take Triton anyway; a dry run interprets it
        for dt in dtypes:
            rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, requires_grad=True)  # noqa: E731
            for case, b, h, lq, lk, d in ATTENTION:
                (b, h), lk = (1, 1) if dry else (b, h), lk if lk == 77 else shrink(lk)    # 77: a caption
                q, k, v = rnd(b, h, shrink(lq), d), rnd(b, h, lk, d), rnd(b, h, lk, d)
                backends = [SDPBackend.MATH] if dry else [SDPBackend.FLASH_ATTENTION]

                def sdpa(q, k, v, backends=backends):
                    with sdpa_kernel(backends):
                        return F.scaled_dot_product_attention(q, k, v)
                compare("attention", case, dt, kernels.attention, sdpa, (q, k, v))
            for case, (n, c, hh, ww) in GROUP_NORM:
                x, w, bias = rnd(n, width(c), side(hh), side(ww)), rnd(width(c)), rnd(width(c))
                compare("group_norm+silu", case, dt, lambda x, w, b: kernels.group_norm(x, 32, w, b, 1e-5, silu=True),
                        lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-5)), (x, w, bias))
            for case, (n, seq, c) in LAYER_NORM:
                x, shift, scale = rnd(n, shrink(seq), c), rnd(n, 1, c), rnd(n, 1, c)
                compare("layer_norm adaLN", case, dt,
                        lambda x, sh, sc: kernels.layer_norm_modulated(x, sh, sc, eps=1e-6),
                        lambda x, sh, sc: F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + sc) + sh, (x, shift, scale))
            for case, (n, seq, c) in RMS_NORM:
                x, w = rnd(n, shrink(seq), c), rnd(c)
                compare("rms_norm", case, dt, kernels.rms_norm, rms_norm_ref, (x, w))


# ------------------------------------------------------------------------------------------------ 3. models

def model_configs(family, dry):
    """(UNetConfig, VAEConfig, [CLIPTextConfig]) at full size, or tiny ones of the same structure (dry run)."""
    if not dry:
        encoders = ["clip-l"] + (["openclip-bigg"] if family == "sdxl" else [])
        return unet.CONFIGS[family], vae.CONFIGS["sdxl" if family == "sdxl" else "sd"], \
            [clip.CONFIGS[e] for e in encoders]
    text = clip.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=77, eos_token_id=2, projection_dim=32)
    small = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8)
    if family == "sdxl":
        u = replace(unet.CONFIGS["sdxl"], transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2),
                    cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **small)
        texts = [text, replace(text, hidden_act="gelu", with_projection=True)]
    else:
        u = replace(unet.CONFIGS["sd15"], attention_head_dim=2, cross_attention_dim=32,
                    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2, **small)
        texts = [text]
    base = vae.CONFIGS["sdxl" if family == "sdxl" else "sd"]
    v = replace(base, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=16)
    return u, v, texts


def write_pipeline(family, dry, folder, dev):
    """A random pipeline folder, built on `dev` (a fast init) and saved by weights/save.py (full size in bf16)."""
    u, v, texts = model_configs(family, dry)
    vocab = read_clip_vocab(ROOT / "weights/clip_vocab/vocab.json", ROOT / "weights/clip_vocab/merges.txt")
    torch.manual_seed(0)
    with torch.device(dev):
        encoders = [clip.CLIPTextModel(t) for t in texts]
        for e in encoders:     # CLIP's embedding scale (PyTorch's N(0, 1) would swamp every layer)
            torch.nn.init.normal_(e.text_model.embeddings.token_embedding.weight, std=0.02)
            torch.nn.init.normal_(e.text_model.embeddings.position_embedding.weight, std=0.01)
        tokenizers = [clip_tokenizer(*vocab), clip_tokenizer(*vocab, pad_token="!")][:len(texts)]  # SDXL's 2nd: "!"
        pipe = Pipeline(family=family, vae=vae.AutoencoderKL(v), text_encoders=encoders, tokenizers=tokenizers,
                        unet=unet.UNet2DConditionModel(u), config={"force_zeros_for_empty_prompt": family == "sdxl"})
    save_pipeline(pipe, folder, dtype=None if dry else torch.bfloat16)   # half the bytes; train.py loads fp32
    return folder


def unet_forward(args, res, dev, dtype):
    """The SD1.5 UNet forward at 512 px (batch 2, CFG): flash against diffusers, the same random weights."""
    from diffusers import UNet2DConditionModel as RefUNet      # an oracle: here only, as in the tests
    cfg = model_configs("sd15", args.dry_run)[0]
    torch.manual_seed(0)
    with torch.device(dev):
        ours = unet.UNet2DConditionModel(cfg).to(dtype).eval()
        ref = RefUNet.from_config(unet_config(cfg)).to(dtype).eval()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, cfg.sample_size, cfg.sample_size, generator=g).to(dev, dtype)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(dev, dtype)
    t = torch.tensor([999, 999], device=dev)
    bench = timer(dev, rep_ms=500)
    with torch.inference_mode():
        diff = (ours(x, t, ctx).float() - ref(x, t, ctx).sample.float()).abs().max().item()
        t_ours, t_ref = bench(lambda: ours(x, t, ctx)), bench(lambda: ref(x, t, ctx).sample)
    res.add("models", "sd15 unet forward", {"latent": f"2x4x{cfg.sample_size}x{cfg.sample_size}",
                                            "flash_ms": round(t_ours, 2), "diffusers_ms": round(t_ref, 2),
                                            "ratio": round(t_ref / t_ours, 3), "maxdiff": f"{diff:.2e}"})


def sample_latency(args, res, clock, dev, dtype, family, folder, size, env):
    """sample.py's path in process (load_pipeline_with_loras, then generate: 4 flash steps, no CFG), then
    sample.py itself as a subprocess (SD1.5 only: its end-to-end seconds include the load)."""
    t0 = time.perf_counter()
    pipe = load_pipeline_with_loras(folder, dtype, dev, [], fuse=True)
    load_s = time.perf_counter() - t0
    run = lambda: generate(pipe, ["a photo of an astronaut riding a horse"], steps=4, sampler="flash",  # noqa: E731
                           guidance=0, height=size, width=size, progress=False)
    finite = bool(torch.isfinite(run()).all())          # also the warm-up
    figures = {"size": size, "load_s": round(load_s, 2), "image_s": round(timer(dev, rep_ms=3000)(run) / 1e3, 3),
               "finite": finite}
    if family == "sd15":
        out = Path(folder).parent / "sample.png"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "sample.py", "--model", str(folder), "--prompt", "a red bus", "--steps",
                               "4", "--dtype", "bf16" if dev == "cuda" else "fp32", "--device", dev, "--out", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(clock.left(), 1))
        figures.update(cli_s=round(time.perf_counter() - t0, 1), cli_ok=proc.returncode == 0 and out.is_file())
    res.add("models", f"{family} sample 4 steps", figures)


def train_steps(args, res, clock, family, folder, work, env):
    """tests/train_bench.py: 3 steps per variant (phases warm-up, 1, 2), s/step = mean of steps 1-2."""
    dry, (size, batch) = args.dry_run, (16, 2) if args.dry_run else ((1024, 1) if family == "sdxl" else (512, 4))
    data = Path(work) / f"images-{size}"
    if not data.is_dir():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(f"a random picture number {i}")
    base = Path(work) / f"train-{family}"
    shutil.rmtree(base, ignore_errors=True)          # no log of an earlier run (--work) read as this one's
    extra = ["--lora-rank", "4"] if dry else []          # full size: the paper's rank (train.py's default)
    cmd = [sys.executable, "tests/train_bench.py", "--out", str(base), "--", "--model", str(folder),
           "--data", str(data), "--steps", "3", "--phase-len", "1", "--batch-size", str(batch),
           "--resolution", str(size), "--checkpoint-every", "1000", *extra]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=max(clock.left(), 1))
        if proc.returncode:
            res.add("models", f"{family} train", {"error": proc.stderr.strip()[-400:]})
    except subprocess.TimeoutExpired:
        res.add("models", f"{family} train", {"timed_out": round(clock.left())})   # the logs so far are reported
    for variant in ("lora", "two-copy", "lora-ckpt", "two-copy-ckpt"):
        log, err = base / variant / "log.jsonl", base / variant / "error.txt"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        later = [r["seconds"] for r in records[1:]] or [r["seconds"] for r in records]
        figures = {"resolution": size, "batch": batch, "steps_logged": len(records),
                   "two_copy": any(r.get("two_copy") for r in records),
                   "s_per_step": round(statistics.mean(later), 3) if later else None,
                   "peak_gb": round(max(r["peak_gb"] or 0 for r in records), 2) if records and dry is False else None}
        if err.is_file():
            figures["error"] = err.read_text().splitlines()[0][:300]
        res.add("models", f"{family} train step {variant}", figures)


def section_models(args, res, clock, dev, env):
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    work = Path(args.work or tempfile.mkdtemp(prefix="flash-gpu-"))
    steps = [("sd15 unet forward", 30, lambda: unet_forward(args, res, dev, dtype))]
    for family, size, need in (("sd15", 512, 60), ("sdxl", 1024, 120)):
        folder, size = work / f"{family}-pipeline" / "model", 16 if args.dry_run else size

        def pipeline(f=family, p=folder):     # reused from an earlier run's --work folder
            return (p / "model_index.json").is_file() or write_pipeline(f, args.dry_run, p, dev)
        steps += [(f"{family} pipeline", need / 2, pipeline),
                  (f"{family} sample", need / 4,
                   lambda f=family, p=folder, s=size: sample_latency(args, res, clock, dev, dtype, f, p, s, env)),
                  (f"{family} train", need, lambda f=family, p=folder: train_steps(args, res, clock, f, p, work, env))]
    for name, need, step in steps:
        if clock.left() < (5 if args.dry_run else need):
            res.add("models", name, {"skipped_for_budget": round(clock.left())})
            continue
        t0 = time.monotonic()
        try:
            step()
        except Exception as e:                   # a CUDA-only failure is a finding: recorded, and the run goes on
            res.add("models", name, {"error": f"{type(e).__name__}: {e}"[:400]})
        res.data["meta"]["seconds"][name] = round(time.monotonic() - t0, 1)
        print(f"  models {name}: {time.monotonic() - t0:.0f} s", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)     # tens of GB of random weights


# ----------------------------------------------------------------------------------------------- 4. results

def check_targets(res):
    """The issue's targets against the figures measured (attention and GN+SiLU: the worst case of each)."""
    k, m, targets = res.data["kernels"], res.data["models"], []
    attn = [r["ratio"] for r in k if r["op"] == "attention" and r["mode"] == "fwd+bwd" and "self" in r["case"]
            and r["case"].startswith(("sd15", "sdxl"))]
    if attn:
        targets.append({"target": "attention fwd+bwd >= 0.9x SDPA flash (SD1.5/SDXL self-attention, worst)",
                        "figure": f"{min(attn):.2f}x", "met": min(attn) >= 0.9})
    gn = [r["ratio"] for r in k if r["op"] == "group_norm+silu" and r["mode"] == "fwd"]
    if gn:
        targets.append({"target": "GroupNorm+SiLU >= 1.3x faster than F.group_norm + F.silu (forward, worst)",
                        "figure": f"{min(gn):.2f}x", "met": min(gn) >= 1.3})
    for family in ("sd15", "sdxl"):
        for ckpt in ("", "-ckpt"):
            one, two = m.get(f"{family} train step lora{ckpt}", {}), m.get(f"{family} train step two-copy{ckpt}", {})
            if one.get("peak_gb") and two.get("peak_gb"):
                r = one["peak_gb"] / two["peak_gb"]
                what = f"{family} Flash step peak memory{' (checkpointing)' if ckpt else ''} <= 0.6x two-copy"
                targets.append({"target": what, "figure": f"{r:.2f}x ({one['peak_gb']} / {two['peak_gb']} GB)",
                                "met": r <= 0.6})
    tests = res.data["tests"].values()
    fails = sum((r.get("failed") or 0) + (r.get("errors") or 0) for r in tests)
    unknown = sum(r.get("passed") is None for r in tests)          # no report, or skipped for the budget
    if tests:
        targets.append({"target": "no CUDA test fails", "figure": f"{fails} failed, {unknown} suites not run",
                        "met": fails == 0 and not unknown})
    res.data["targets"] = targets
    res.save()


def versions(dev):
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "none" if dev == "cpu" else "unknown"
    cpu = f"cpu {platform.processor() or platform.machine()}"
    return {"device": torch.cuda.get_device_name() if dev == "cuda" else cpu,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "driver": driver,
            "python": platform.python_version()}


def main():
    args, env = parse_args(), ENV
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device; run it on a GPU machine, or try --dry-run", file=sys.stderr)
        return 2
    dev = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.set_num_threads(1)
    clock = Clock(args.budget or (600 if args.dry_run else 480), args.only)
    meta = {**versions(dev), "date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
            "budget_s": clock.budget, "seconds": {}}
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")   # "nvidia-h200"
    slug = "cpu-dryrun" if args.dry_run else slug
    folder = args.out or (tempfile.mkdtemp(prefix="flash-gpu-dry-") if args.dry_run else ROOT / "bench" / "results")
    res = Results(folder, f"gpu-{slug}-{meta['date']}", meta)
    print(f"bench/gpu.py: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}; "
          f"budget {clock.budget:.0f} s; results in {res.base}.md / .json", flush=True)
    sections = {"tests": lambda: section_tests(args, res, clock, env),
                "kernels": lambda: section_kernels(args, res, clock, dev),
                "models": lambda: section_models(args, res, clock, dev, env)}
    for i, name in enumerate(n for n in SHARES if n in args.only):
        clock.open(name)
        print(f"[{i + 1}/{len(args.only)}] {name} (until +{clock.deadline - clock.start:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            sections[name]()
        except Exception as e:            # the section is recorded as failed; the next one still runs
            res.data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:600]
            res.save()
            print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
        meta["seconds"][name] = round(time.monotonic() - t0, 1)
        res.save()
        print(f"[{i + 1}/{len(args.only)}] {name} done in {time.monotonic() - t0:.0f} s "
              f"(total {time.monotonic() - clock.start:.0f} s)", flush=True)
    meta["seconds"]["total"] = round(time.monotonic() - clock.start, 1)
    check_targets(res)
    print(f"bench/gpu.py: done in {time.monotonic() - clock.start:.0f} s; {res.base}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
