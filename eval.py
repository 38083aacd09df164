"""Evaluate a text-to-image pipeline on the digits: FID against the held-out real digits, prompt accuracy,
network evaluations and speed, printed as a markdown table; with --task, an inpainting, super-resolution
or adapter model on the held-out digits.

    python eval.py --model weights/digits --sampler dpm++2m --steps 25 --guidance 3 --n 1000
    python eval.py --model weights/digits --lora weights/digits/flash_lora.safetensors --sampler flash --steps 4
    python eval.py --rows [--model ...] [--lora ...] [--json results.json]     (the README table)
    python eval.py --task inpaint --rows        (weights/digits-inpaint and its LoRA; also upscale, adapter)
    python eval.py --task upscale --rows --upscale 4
    python eval.py --task adapter --model runs/x/final --lora runs/x/lora.safetensors --sampler flash --steps 4
    python eval.py --coco captions_val2017.json --coco-images val2017 --n 5000 --clip CLIP_FOLDER \
        --model SD15 --lora LORA --sampler flash --steps 4 --out runs/coco
    torchrun --nproc_per_node=8 eval.py --coco ... --images 5000 ...       (torchrun reads --n as its own)

The protocol (per-image prompts and seeds, FID, prompt accuracy, NFE, timing) and the README rows are
flash/evaluate.py's; the task inputs and measures (PSNR in the hole, PSNR of the upscaled image, edge F1)
and their baseline rows flash/evaluate_tasks.py's. This script parses and checks the arguments, loads the
pipeline (the LoRA attached as adapters: the teacher rows switch it off, the student rows fuse it) and the
metric networks, evaluates the rows and prints the table (and the JSON with --json).
--rows evaluates the README's rows: the teacher with DPM-Solver++ 2M at 25 and 4 steps with CFG
(--guidance, default 3), and the Flash student (the teacher + --lora) at 1, 2 and 4 steps without CFG (with
--task at 4 and 2 steps, after the task's baselines).
--task evaluates a task model (default weights/digits-<task>, LoRA flash_lora.safetensors in it) on the
first n (<= 500, default 500) held-out digits.
--coco evaluates on COCO captions: FID against the reference images and CLIP score, resumable and
sharded over torchrun's ranks (protocol in flash/evaluate_coco.py).
Errors the user can cause end in one line on stderr, exit status 2.
"""
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from flash.cli import (DEFAULT_LORA, DEFAULT_MODEL, DTYPES, TASKS, Parser, check_device, check_finite, check_output,
                       default_model, dtype_name)
from flash.evaluate import (IMAGES_MAX, REAL_TOTAL, SEEDS_MAX, TEACHER_GUIDANCE, Row, evaluate, load_metrics,
                            readme_rows, table)
from flash.distributed import barrier, cleanup, setup_distributed
from flash.evaluate_coco import CocoMetrics, draw_subset, generate_images, markdown_row, read_captions, score
from flash.evaluate_tasks import TaskRow, evaluate_task
from flash.evaluate_tasks import readme_rows as task_readme_rows, table as task_table
from flash.io import CheckpointError, write_text
from flash.metrics import load_inception
from flash.pipeline import default_guidance
from flash.schedule import SAMPLERS
from flash.tasks import UPSCALE_FACTORS
from weights import load_clip_text, load_image_encoder, load_pipeline_with_loras, load_tokenizer

ROOT = Path(__file__).resolve().parent
CLIP_VOCAB = ROOT / "weights" / "clip_vocab"    # every CLIP shares this vocabulary: used when --clip has none


# -- arguments ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help="a diffusers pipeline folder or single-file checkpoint "
                      f"(default: {DEFAULT_MODEL.relative_to(ROOT)}, with --task weights/digits-TASK)")
    a("--lora", help="a Flash LoRA fused into the denoiser (the student); with --rows, the student rows' "
                     f"(default there: {DEFAULT_LORA} in the default model folder)")
    a("--task", choices=TASKS, help="evaluate a task model on the held-out digits: inpaint (random box "
                                         "masks), upscale (2x and 4x), adapter (edge maps); see "
                                         "flash/evaluate_tasks.py")
    a("--upscale", type=int, choices=UPSCALE_FACTORS, action="append",
      help="with --task upscale: the factor evaluated; repeatable (default: 2 and 4)")
    a("--rows", action="store_true", help="evaluate the README table rows instead of one setting")
    a("--sampler", choices=SAMPLERS, help="sampler of the one evaluated setting (default: flash)")
    a("--steps", type=int, help="denoiser steps of the one evaluated setting (default: 4)")
    a("--guidance", type=float, help="CFG scale, <= 1 disables CFG (default: 0 for flash / lcm, 7.5 otherwise; "
                                     f"with --rows, the teacher rows' scale, default {TEACHER_GUIDANCE})")
    a("--n", "--images", dest="n", type=int,
      help="images per row (default: 1000; with --task the first n held-out digits, "
           f"at most {REAL_TOTAL}, default {REAL_TOTAL}; with --coco the captions drawn; under torchrun spell "
           "it --images: torchrun's own parser takes --n for an abbreviation of its options)")
    a("--seed", type=int, default=0, help="base seed of the per-image generators (default: %(default)s)")
    a("--batch", type=int, default=50, help="images per generate call (default: %(default)s)")
    a("--real", type=int, default=REAL_TOTAL, help="held-out real digits used for FID, evenly spaced "
                                                   "(fewer only for quick checks; default: %(default)s)")
    a("--coco", metavar="CAPTIONS_JSON", help="evaluate on COCO: a captions annotation file "
                                              "(captions_val2017.json, captions_val2014.json)")
    a("--coco-images", metavar="DIR", help="with --coco: the folder of its reference images")
    a("--clip", metavar="CHECKPOINT", help="with --coco: the CLIP of the CLIP score, a transformers CLIPModel "
                                            "folder or an open_clip .safetensors file (LAION's, GELU)")
    a("--out", metavar="DIR", help="with --coco: where the generated PNGs, the feature cache and the results go")
    a("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)")
    a("--dtype", choices=DTYPES, help="weights dtype (default: fp16 on CUDA, fp32 otherwise, CPUs with bf16 units "
                                      "included: the reference rows; bf16 gives the fast path's)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_outputs(args):
    """The numbers and output paths that would otherwise fail after the whole evaluation, checked first."""
    check_finite("--guidance", args.guidance)
    if not 0 <= args.seed < SEEDS_MAX:
        raise ValueError(f"--seed must be in [0, {SEEDS_MAX}), got {args.seed}")
    if args.json and args.json != "-":
        check_output(args.json, "--json")
        if not Path(args.json).parent.is_dir():
            raise ValueError(f"--json {args.json}: no such folder {Path(args.json).parent}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    if args.out:
        check_output(Path(args.out) / "results.json", "--out")


def check_args(args):
    """Fail before the (slow) model load on arguments that are wrong whatever the model."""
    check_outputs(args)
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
    if args.rows and (args.sampler or args.steps):
        raise ValueError("--rows evaluates fixed samplers and steps; drop --sampler / --steps")
    default = default_model(args.task)
    model = Path(args.model) if args.model else default
    if not model.exists():
        raise ValueError(f"--model {model}: no such folder or file")
    lora = Path(args.lora) if args.lora else (default / DEFAULT_LORA if args.rows else None)
    if lora is not None and not lora.exists():
        hint = " (--rows needs the student's LoRA)" if args.rows else ""
        raise ValueError(f"--lora {lora}: no such file or folder{hint}")
    check_device(args.device)
    return model, lora


# -- loading and rows --------------------------------------------------------------------------------

def load(args, model, lora, task):
    """Everything that can fail fast, loaded before the first (long) row -> (pipe, flash.evaluate.Metrics).
    The pipeline must be one for `task` and draw digit-sized images; the LoRA is attached as adapters
    (flash.evaluate.lora_mode switches it per row)."""
    device = torch.device(args.device)
    metrics = load_metrics(device, args.real)
    pipe = load_pipeline_with_loras(model, DTYPES[dtype_name(args.dtype, device, cpu_bf16=False)], device,
                                    [(lora, 1.0)] if lora is not None else [], fuse=False)
    if pipe.task != task:
        fix = (f"; evaluate it with --task {pipe.task}" if task == "text-to-image"
               else f", not for {task} (--task {task})")
        raise ValueError(f"--model {model}: a pipeline for {pipe.task}{fix}")
    size = metrics.real.shape[-1]
    if pipe.default_size != size:
        raise ValueError(f"--model {model}: draws {pipe.default_size}x{pipe.default_size} images; the digit "
                         f"metrics compare {size}x{size} ones")
    return pipe, metrics


def rows_for(args, lora):
    """The README rows (--rows), or the one setting of --sampler / --steps / --guidance (with --task upscale,
    one per factor)."""
    factors = sorted(set(args.upscale or UPSCALE_FACTORS)) if args.task == "upscale" else [None]
    if args.rows:
        guidance = TEACHER_GUIDANCE if args.guidance is None else args.guidance
        return task_readme_rows(args.task, guidance, factors) if args.task else readme_rows(guidance)
    sampler = args.sampler or "flash"
    guidance = default_guidance(sampler) if args.guidance is None else args.guidance
    name, steps, student = "student" if lora else "model", args.steps or 4, lora is not None
    if args.task:
        return [TaskRow(name, sampler, steps, guidance, student, f) for f in factors]
    return [Row(name, sampler, steps, guidance, student=student)]


# -- COCO ---------------------------------------------------------------------------------------------

def check_coco_args(args):
    """Fail before loading anything, on every rank alike (a rank that failed alone would hang the others)."""
    check_outputs(args)
    for name in ("coco_images", "clip", "out", "n"):
        if getattr(args, name) is None:
            raise ValueError(f"--coco needs --{name.replace('_', '-')}")
    if args.task or args.rows:
        raise ValueError("--coco evaluates one setting of a text-to-image pipeline; drop --task / --rows")
    for name in ("coco", "coco_images", "clip"):
        if not Path(getattr(args, name)).exists():
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: no such file or folder")
    if args.n < 2 or args.batch < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--n must be >= 2, --batch and --steps >= 1")
    model = Path(args.model) if args.model else default_model(None)
    if not model.exists():
        raise ValueError(f"--model {model}: no such folder or file")
    if args.lora and not Path(args.lora).exists():
        raise ValueError(f"--lora {args.lora}: no such file or folder")
    return model, Path(args.lora) if args.lora else None


def clip_tag(clip):
    """The CLIP's part of the image-feature cache key: its name and a hash of its absolute path."""
    return f"{clip.name}-{hashlib.sha1(str(clip.resolve()).encode()).hexdigest()[:8]}"


def load_coco_metrics(clip, device, dtype):
    """The FID Inception and the CLIP of --clip, both towers (its tokenizer, else the shipped CLIP vocabulary,
    which every CLIP shares)."""
    clip = Path(clip)
    tokenizer = load_tokenizer(clip if (clip / "vocab.json").is_file() or (clip / "tokenizer.json").is_file()
                               else CLIP_VOCAB)
    return CocoMetrics(load_inception().to(device), load_image_encoder(clip, dtype).to(device),
                       load_clip_text(clip, dtype).to(device), tokenizer, clip_tag(clip), device)


def run_coco(args):
    """Every rank generates its share of the images; rank 0 then scores them -> the result dict (None on
    other ranks)."""
    model, lora = check_coco_args(args)
    entries = draw_subset(read_captions(args.coco), args.n)
    d = setup_distributed()
    device = d.device if d.world > 1 else torch.device(args.device)
    dtype = DTYPES[dtype_name(args.dtype, device, cpu_bf16=False)]
    sampler, steps = args.sampler or "flash", args.steps or 4
    guidance = default_guidance(sampler) if args.guidance is None else args.guidance
    pipe = load_pipeline_with_loras(model, dtype, device, [(lora, 1.0)] if lora else [], fuse=True)
    made = generate_images(pipe, entries, args.out, steps, sampler, guidance, args.seed, args.batch, d.rank,
                           d.world, not args.no_progress)
    print(f"coco: rank {d.rank}: generated {made} images", file=sys.stderr)
    del pipe
    barrier(d)                   # every image exists; the other ranks leave while rank 0 scores
    cleanup(d)
    if d.rank != 0:
        return None
    metrics = load_coco_metrics(args.clip, device, torch.float32)
    result = score(metrics, entries, args.out, args.coco_images, args.batch, not args.no_progress)
    name = "student" if lora else "model"
    header, row = markdown_row(name, sampler, steps, guidance, result)
    report = {"model": str(model), "lora": str(lora) if lora else None, "sampler": sampler, "steps": steps,
              "guidance": guidance, "seed": args.seed, "clip": str(args.clip), "captions": str(args.coco),
              "world": d.world, **result, "markdown": row}
    out = Path(args.out)
    write_text(json.dumps(report, indent=2) + "\n", out / "results.json")
    write_text(f"{header}\n{row}\n", out / "results.md")
    print(f"{header}\n{row}")
    return report


# -- main --------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.coco:
        try:
            report = run_coco(args)
        except (CheckpointError, ValueError, FileNotFoundError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        if report is not None and args.json:
            write_json(report, args.json)
        return 0
    task = args.task or "text-to-image"
    try:
        model, lora = check_args(args)
        pipe, metrics = load(args, model, lora, task)
        rows, progress = rows_for(args, lora), not args.no_progress
        if args.task:
            results = evaluate_task(pipe, args.task, rows, metrics, args.n, args.seed, args.batch, progress)
        else:
            results = evaluate(pipe, rows, metrics, args.n, args.seed, args.batch, progress)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.task:
        print(task_table(args.task, results, metrics.classifier_accuracy, args.real))
    else:
        print(table(results, metrics.classifier_accuracy, args.real))
    if args.json:
        report = {"model": str(model), "lora": str(lora) if lora else None, "task": task,
                  "n": args.n, "seed": args.seed,
                  "real": args.real, "device": args.device, "dtype": dtype_name(args.dtype, args.device, False),
                  "classifier_heldout_accuracy": metrics.classifier_accuracy, "rows": [asdict(r) for r in results]}
        write_json(report, args.json)
    return 0


def write_json(report, dest):
    """The report as JSON on stdout ('-') or in the file `dest`."""
    text = json.dumps(report, indent=2)
    if dest == "-":
        print(text)
    else:
        write_text(text + "\n", dest)


if __name__ == "__main__":
    sys.exit(main())
