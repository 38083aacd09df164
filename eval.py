"""Evaluate a text-to-image pipeline on the digits: FID against the held-out real digits, prompt accuracy,
network evaluations and speed, printed as a markdown table; with --task, an inpainting, super-resolution
or adapter model on the held-out digits (eval_tasks.py).

    python eval.py --model weights/digits --sampler dpm++2m --steps 25 --guidance 3 --n 1000
    python eval.py --model weights/digits --lora weights/digits/flash_lora.safetensors --sampler flash --steps 4
    python eval.py --rows [--model ...] [--lora ...] [--json results.json]     (the README table)
    python eval.py --task inpaint --rows        (weights/digits-inpaint and its LoRA; also upscale, adapter)

Protocol (fixed, so a rerun reproduces the numbers):
- Image i (i = 0..n-1) is prompted with flash.data.caption_for(i % 10) ("a handwritten digit seven"), and
  its initial noise (and any sampler re-noising) comes from its own torch.Generator("cpu") seeded with
  seed * 2^20 + i (CPU generators keep only 32 bits of a seed, hence seed < 4096 and n <= 2^20): the same
  seed gives the same image whatever --batch or --n, and every row of a table starts image i from the
  same noise.
- FID (flash/metrics.py: the TF-FID InceptionV3, Frechet distance in float64) between the n generated images
  and the 500 held-out real digits (Digits("test")); the real set's features are cached under data/.
  With n = 1000 against 500 real images the value carries a small-sample bias (FID grows as sets shrink):
  compare rows measured with the same n, not with published FIDs.
- Prompt accuracy: the share of images that the shipped digit classifier labels as the prompted digit; the
  classifier's own accuracy on the held-out real digits is reported beside it (the ceiling of the metric).
- NFE per image: denoiser rows evaluated / images, counted by a hook on the denoiser (CFG runs the
  unconditional and conditional halves in one batch, so it counts twice per step).
- Seconds per image and images per second: wall time of generation (text encoding, sampling, VAE decode)
  after one warm-up image, excluding the metric networks.
--rows evaluates the README's rows: the teacher with DPM-Solver++ 2M at 25 and 4 steps with CFG
(--guidance, default 3), and the Flash student (the teacher + --lora) at 1, 2 and 4 steps without CFG.
--task evaluates a task model (default weights/digits-<task>, LoRA flash_lora.safetensors in it) on the
first n (<= 500, default 500) held-out digits, whose protocol and metrics eval_tasks.py describes.
Errors the user can cause end in one line on stderr, exit status 2.
"""
import hashlib
from contextlib import nullcontext
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flash.cli import DEFAULT_MODEL, DTYPES, Parser
from flash.schedule import SAMPLERS
from flash.tasks import UPSCALE_FACTORS

ROOT = Path(__file__).resolve().parent
LORA_NAME = "flash_lora.safetensors"      # the Flash student inside a shipped model folder
EVAL_TASKS = ("inpaint", "upscale", "adapter")
CACHE_DIR = ROOT / "data"
REAL_TOTAL = 500                 # held-out digits: the last 50 of each class
TEACHER_GUIDANCE = 3.0
IMAGES_MAX, SEEDS_MAX = 2 ** 20, 2 ** 12   # image_seed() stays below 2^32


@dataclass
class Row:
    name: str
    sampler: str
    steps: int
    guidance: float
    student: bool = False        # with the LoRA


def readme_rows(guidance=TEACHER_GUIDANCE):
    return [Row("teacher", "dpm++2m", 25, guidance), Row("teacher", "dpm++2m", 4, guidance),
            *(Row("Flash student", "flash", s, 0.0, student=True) for s in (1, 2, 4))]


# -- arguments ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help="a diffusers pipeline folder or single-file checkpoint "
                      f"(default: {DEFAULT_MODEL.relative_to(ROOT)}, with --task weights/digits-TASK)")
    a("--lora", help="a Flash LoRA fused into the denoiser (the student); with --rows, the student rows' "
                     f"(default there: {LORA_NAME} in the default model folder)")
    a("--task", choices=EVAL_TASKS, help="evaluate a task model on the held-out digits: inpaint (random box "
                                         "masks), upscale (2x and 4x), adapter (edge maps); see eval_tasks.py")
    a("--upscale", type=int, choices=UPSCALE_FACTORS, action="append",
      help="with --task upscale: the factor evaluated; repeatable (default: 2 and 4)")
    a("--rows", action="store_true", help="evaluate the README table rows instead of one setting")
    a("--sampler", choices=SAMPLERS, help="sampler of the one evaluated setting (default: flash)")
    a("--steps", type=int, help="denoiser steps of the one evaluated setting (default: 4)")
    a("--guidance", type=float, help="CFG scale, <= 1 disables CFG (default: 0 for flash / lcm, 7.5 otherwise; "
                                     f"with --rows, the teacher rows' scale, default {TEACHER_GUIDANCE})")
    a("--n", type=int, help="images per row (default: 1000; with --task the first n held-out digits, "
                            f"at most {REAL_TOTAL}, default {REAL_TOTAL})")
    a("--seed", type=int, default=0, help="base seed of the per-image generators (default: %(default)s)")
    a("--batch", type=int, default=50, help="images per generate call (default: %(default)s)")
    a("--real", type=int, default=REAL_TOTAL, help="held-out real digits used for FID, evenly spaced "
                                                   "(fewer only for quick checks; default: %(default)s)")
    a("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)")
    a("--dtype", choices=DTYPES, help="weights dtype (default: fp16 on CUDA, fp32 otherwise)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args):
    """Fail before the (slow) model load on arguments that are wrong whatever the model."""
    if args.n is None:
        args.n = REAL_TOTAL if args.task else 1000
    for name, low in (("n", 2), ("batch", 1), ("steps", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name} must be >= {low}, got {v}")
    top = REAL_TOTAL if args.task else IMAGES_MAX
    if args.n > top:
        what = " (the held-out digits are the task inputs)" if args.task else ""
        raise ValueError(f"--n must be <= {top}{what}, got {args.n}")
    if args.upscale and args.task != "upscale":
        raise ValueError("--upscale sets the factor of --task upscale; drop it or pass --task upscale")
    if not 2 <= args.real <= REAL_TOTAL:
        raise ValueError(f"--real must be in [2, {REAL_TOTAL}], got {args.real}")
    if not 0 <= args.seed < SEEDS_MAX:
        raise ValueError(f"--seed must be in [0, {SEEDS_MAX}), got {args.seed}")
    if args.rows and (args.sampler or args.steps):
        raise ValueError("--rows evaluates fixed samplers and steps; drop --sampler / --steps")
    default = DEFAULT_MODEL.parent / f"digits-{args.task}" if args.task else DEFAULT_MODEL
    model = Path(args.model) if args.model else default
    if not model.exists():
        raise ValueError(f"--model {model}: no such folder or file")
    lora = Path(args.lora) if args.lora else (default / LORA_NAME if args.rows else None)
    if lora is not None and not lora.exists():
        hint = " (--rows needs the student's LoRA)" if args.rows else ""
        raise ValueError(f"--lora {lora}: no such file or folder{hint}")
    if args.json and args.json != "-" and not Path(args.json).parent.is_dir():
        raise ValueError(f"--json {args.json}: no such folder {Path(args.json).parent}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    return model, lora


# -- generation --------------------------------------------------------------------------------------

def prompts_for(n):
    """(labels, prompts) of images 0..n-1: the digits 0-9 in turn, each with its evaluation caption."""
    from flash.data import caption_for
    labels = [i % 10 for i in range(n)]
    return labels, [caption_for(label) for label in labels]


def image_seed(seed, i):
    """The seed of image i's generator (see the module docstring); 32 bits, all that a CPU generator uses."""
    return seed * IMAGES_MAX + i


class NFECounter:
    """Counts the batch rows the denoiser evaluates (a forward pre-hook: CFG's doubled batch counts twice)."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.rows += args[0].shape[0]

    def close(self):
        self.handle.remove()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_batches(pipe, run, n, batch=50, desc="", progress=True):
    """run(first, count) -> images for inputs first..first+count-1, called in batches after a one-image
    warm-up -> (images (n, 3, H, W) float on the CPU, NFE per image, seconds of generation)."""
    run(0, 1)                                   # warm-up: first-call costs (allocations, kernel selection)
    counter, images, seconds = NFECounter(pipe.denoiser), [], 0.0
    try:
        with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for first in range(0, n, batch):
                count = min(batch, n - first)
                _sync(pipe.device)
                start = time.perf_counter()
                out = run(first, count)
                _sync(pipe.device)
                seconds += time.perf_counter() - start
                images.append(out.float().cpu())
                bar.update(count)
    finally:
        counter.close()
    return torch.cat(images), counter.rows / n, seconds


def generate_row(pipe, row, n, seed=0, batch=50, progress=True):
    """n images for `row` -> (images (n, 3, H, W) in [0, 1] on the CPU, NFE per image, seconds of generation)."""
    from flash.pipeline import generate
    _, prompts = prompts_for(n)

    def run(first, count):
        gens = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(first, first + count)]
        return generate(pipe, prompts[first:first + count], steps=row.steps, sampler=row.sampler,
                        guidance=row.guidance, generator=gens, progress=False)

    return timed_batches(pipe, run, n, batch, f"{row.name} {row.sampler} {row.steps}", progress)


# -- metrics -----------------------------------------------------------------------------------------

def real_digits(count=REAL_TOTAL):
    """`count` held-out real digits, evenly spaced over the 500 (all classes stay represented), in [-1, 1]."""
    from flash.data import Digits
    test = Digits("test")
    idx = torch.arange(count) * len(test) // count
    return test.images[idx], test.labels[idx]


def real_features(inception, images, device, batch=50):
    """Inception features of the real set, cached in CACHE_DIR per device type (GPU convolutions round
    differently) under a SHA-1 of the images: recomputed when the data or the count change, or the cache is
    unreadable."""
    from safetensors import SafetensorError, safe_open
    from flash.metrics import inception_features
    from flash.io import write_safetensors
    digest = hashlib.sha1(images.float().contiguous().numpy().tobytes()).hexdigest()
    path = CACHE_DIR / f"fid_digits_test_{len(images)}_{torch.device(device).type}.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("images_sha1") == digest:
                return f.get_tensor("features")
    except (OSError, SafetensorError):
        pass
    feats = inception_features(inception, images.to(device), batch).cpu()
    write_safetensors({"features": feats}, path, metadata={"images_sha1": digest})
    return feats


@dataclass
class Result:
    name: str
    sampler: str
    steps: int
    guidance: float
    n: int
    nfe_per_image: float
    fid: float
    prompt_accuracy: float
    seconds_per_image: float
    images_per_second: float


def score(row, images, nfe, seconds, real_feats, inception, classifier, device, batch=50):
    from flash.metrics import fid_from_features, inception_features, prompt_accuracy
    labels, _ = prompts_for(len(images))
    x = images * 2 - 1                                          # [0, 1] -> [-1, 1], as the metrics expect
    fid = fid_from_features(inception_features(inception, x.to(device), batch).cpu(), real_feats)
    acc = prompt_accuracy(x.to(device), torch.tensor(labels), classifier)
    n = len(images)
    return Result(row.name, row.sampler, row.steps, row.guidance, n, nfe, fid, acc, seconds / n, n / seconds)


def table(results, classifier_accuracy, real_count):
    lines = ["| model | sampler | steps | CFG | NFE / image | FID | prompt accuracy | s / image | images / s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        cfg = f"{r.guidance:g}" if r.guidance > 1 else "-"
        lines.append(f"| {r.name} | {r.sampler} | {r.steps} | {cfg} | {r.nfe_per_image:g} | {r.fid:.2f} | "
                     f"{100 * r.prompt_accuracy:.1f}% | {r.seconds_per_image:.4f} | {r.images_per_second:.1f} |")
    n = results[0].n if results else 0
    lines.append(f"\nFID: {n} generated vs {real_count} held-out real digits (TF-FID Inception). Prompt accuracy: "
                 f"the digit classifier, {100 * classifier_accuracy:.1f}% on the held-out real digits.")
    return "\n".join(lines)


def dtype_name(args):
    return args.dtype or ("fp16" if torch.device(args.device).type == "cuda" else "fp32")


# -- main --------------------------------------------------------------------------------------------

def load_models(args, model, lora, task="text-to-image"):
    """Everything that can fail fast, loaded before the first (long) row -> (pipe, the real digits, Inception,
    the digit classifier, its accuracy on the real digits). The pipeline must be one for `task` and draw
    digit-sized images; the LoRA is attached as adapters (see lora_mode)."""
    import weights
    from flash.lora import load_lora
    from flash.metrics import load_digit_classifier, load_inception, prompt_accuracy
    device, dtype = torch.device(args.device), DTYPES[dtype_name(args)]
    real, real_labels = real_digits(args.real)
    inception = load_inception().to(device)
    classifier = load_digit_classifier().to(device)
    classifier_accuracy = prompt_accuracy(real.to(device), real_labels, classifier)
    pipe = weights.load_pipeline(model, dtype=dtype).to(device=device)
    if pipe.task != task:
        fix = (f"; evaluate it with --task {pipe.task}" if task == "text-to-image"
               else f", not for {task} (--task {task})")
        raise ValueError(f"--model {model}: a pipeline for {pipe.task}{fix}")
    if pipe.default_size != real.shape[-1]:
        raise ValueError(f"--model {model}: draws {pipe.default_size}x{pipe.default_size} images; the digit "
                         f"metrics compare {real.shape[-1]}x{real.shape[-1]} ones")
    if lora is not None:
        load_lora(pipe.denoiser, lora)
    return pipe, real, inception, classifier, classifier_accuracy


def lora_mode(pipe, row):
    """A student row runs with the LoRA fused (once: fusing is idempotent), a teacher row with it disabled;
    run the teacher rows first, so the LoRA is fused only once."""
    from flash.lora import fuse_lora, lora_disabled
    if row.student:
        fuse_lora(pipe.denoiser)
        return nullcontext()
    return lora_disabled(pipe.denoiser)


def evaluate(args, model, lora):
    """Load, generate and score every row -> (results, classifier accuracy on real digits)."""
    from flash.pipeline import default_guidance
    pipe, real, inception, classifier, classifier_accuracy = load_models(args, model, lora)
    device = torch.device(args.device)
    if args.rows:
        rows = readme_rows(TEACHER_GUIDANCE if args.guidance is None else args.guidance)
    else:
        sampler = args.sampler or "flash"
        guidance = default_guidance(sampler) if args.guidance is None else args.guidance
        rows = [Row("student" if lora else "model", sampler, args.steps or 4, guidance, student=lora is not None)]
    real_feats = real_features(inception, real, device)

    results = []
    for row in sorted(rows, key=lambda r: r.student):          # teacher rows first
        with lora_mode(pipe, row):
            images, nfe, seconds = generate_row(pipe, row, args.n, args.seed, args.batch, not args.no_progress)
        results.append(score(row, images, nfe, seconds, real_feats, inception, classifier, device))
        print(f"eval: {row.name} {row.sampler} {row.steps} steps: FID {results[-1].fid:.2f}, prompt accuracy "
              f"{100 * results[-1].prompt_accuracy:.1f}%", file=sys.stderr)
    return results, classifier_accuracy


def main(argv=None):
    args = parse_args(argv)
    from weights import CheckpointError
    try:
        model, lora = check_args(args)
        if args.task:
            import eval_tasks
            results, classifier_accuracy = eval_tasks.evaluate(args, model, lora)
        else:
            results, classifier_accuracy = evaluate(args, model, lora)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.task:
        print(eval_tasks.table(args.task, results, classifier_accuracy, args.real))
    else:
        print(table(results, classifier_accuracy, args.real))
    if args.json:
        report = {"model": str(model), "lora": str(lora) if lora else None, "task": args.task or "text-to-image",
                  "n": args.n, "seed": args.seed,
                  "real": args.real, "device": args.device, "dtype": dtype_name(args),
                  "classifier_heldout_accuracy": classifier_accuracy, "rows": [asdict(r) for r in results]}
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
