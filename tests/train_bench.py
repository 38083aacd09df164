"""train.py measured, run in its place by bench/gpu.py (`PYTHONPATH=. python tests/train_bench.py ...`):

    python tests/train_bench.py --out BASE --variants lora,two-copy,lora-ckpt,two-copy-ckpt -- TRAIN_ARGS

Runs train.main() once per variant in this one process (one CUDA start-up, the weights read from the page
cache after the first), with `--out BASE/VARIANT` and, for the *-ckpt variants, --gradient-checkpointing.
Every log.jsonl line gets "seconds" (the step, from its first micro-batch to its logged record, the device
synchronised), "peak_gb" (torch.cuda.max_memory_allocated since the variant began; null on CPU) and "two_copy"
(whether the teacher was a separate module). A variant
that fails (e.g. out of memory) leaves BASE/VARIANT/error.txt and the next one runs.

"two-copy" is the reference code's design, for comparison only: the teacher is a deep copy of the base
denoiser taken before the LoRA is injected, so the base weights are held twice. train.py keeps ONE copy
(the student with its adapter switched off is the teacher); this wrapper patches train.inject_lora and
train.build_models to build the other design, the way tests/train_faults.py patches train.py at its seams.
"""
import argparse
import copy
import gc
import json
import time
import traceback
from pathlib import Path

import torch

import train

VARIANTS = ("lora", "two-copy", "lora-ckpt", "two-copy-ckpt")
state = {"two_copy": False, "copies": [], "t0": None}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install():
    inject_lora = train.inject_lora

    def copy_then_inject(denoiser, *a, **k):
        if state["two_copy"]:
            state["copies"].append(copy.deepcopy(denoiser))     # the frozen base, without the adapter
        return inject_lora(denoiser, *a, **k)
    train.inject_lora = copy_then_inject

    build_models = train.build_models

    def build_with_copy(args, device):
        m = build_models(args, device)
        if state["two_copy"]:
            m.teacher = state["copies"].pop()
        return m
    train.build_models = build_with_copy

    accumulate = train.accumulate

    def timed_accumulate(*a):
        sync()
        state["t0"] = time.perf_counter()
        return accumulate(*a)
    train.accumulate = timed_accumulate

    log_record = train.log_record

    def log_with_time(*a):
        record = log_record(*a)
        sync()
        record["seconds"] = time.perf_counter() - state["t0"]
        record["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        record["two_copy"] = a[1].teacher is not a[1].denoiser     # (args, m, ...): which design ran
        return record
    train.log_record = log_with_time


def run(variant, base, train_args):
    out = Path(base) / variant
    out.mkdir(parents=True, exist_ok=True)
    state.update(two_copy=variant.startswith("two-copy"), copies=[])
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    argv = list(train_args) + ["--out", str(out)] + (["--gradient-checkpointing"] if variant.endswith("ckpt") else [])
    try:
        train.main(argv)
    except Exception as e:        # OOM and the like: recorded, and the next variant still runs
        (out / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
    except SystemExit as e:
        (out / "error.txt").write_text(f"SystemExit: {e}\n")
    print(json.dumps({"variant": variant, "out": str(out), "error": (out / "error.txt").is_file()}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="one sub-folder per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's arguments (no --out)")
    args = p.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    install()
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}")
        run(variant, args.out, train_args)


if __name__ == "__main__":
    main()
