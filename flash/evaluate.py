"""The digits evaluation of a text-to-image pipeline (eval.py is its command line): FID against the held-out
real digits, prompt accuracy, network evaluations and speed, per row (a sampler, a step count, a CFG scale,
with or without the Flash LoRA), printed as a markdown table. flash/evaluate_tasks.py builds the
inpainting, super-resolution and adapter evaluation on these pieces.

Protocol (fixed, so a rerun reproduces the numbers):
- Image i (i = 0..n-1) is prompted with flash.data.caption_for(i % 10) ("a handwritten digit seven"), and
  its initial noise (and any sampler re-noising) comes from its own torch.Generator("cpu") seeded with
  seed * 2^20 + i (CPU generators keep only 32 bits of a seed, hence seed < 4096 and n <= 2^20): the same
  seed gives the same image whatever the batch or n, and every row of a table starts image i from the
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
The README rows (readme_rows): the teacher with DPM-Solver++ 2M at 25 and 4 steps with CFG (default 3), and
the Flash student (the teacher + its LoRA) at 1, 2 and 4 steps without CFG.
"""
import hashlib
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from flash.data import DIGITS_FILE, Digits, caption_for
from flash.io import cached_features
from flash.lora import fuse_lora, lora_disabled
from flash.metrics import (fid_from_features, inception_features, load_digit_classifier, load_inception,
                           prompt_accuracy)
from flash.pipeline import generate

CACHE_DIR = DIGITS_FILE.parent   # data/: the real set's Inception features are cached beside the digits
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


def lora_mode(pipe, row):
    """A student row runs with the LoRA fused (once: fusing is idempotent), a teacher row with it disabled;
    run the teacher rows first, so the LoRA is fused only once."""
    if row.student:
        fuse_lora(pipe.denoiser)
        return nullcontext()
    return lora_disabled(pipe.denoiser)


# -- generation --------------------------------------------------------------------------------------

def prompts_for(n):
    """(labels, prompts) of images 0..n-1: the digits 0-9 in turn, each with its evaluation caption."""
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
    _, prompts = prompts_for(n)

    def run(first, count):
        gens = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(first, first + count)]
        return generate(pipe, prompts[first:first + count], steps=row.steps, sampler=row.sampler,
                        guidance=row.guidance, generator=gens, progress=False)

    return timed_batches(pipe, run, n, batch, f"{row.name} {row.sampler} {row.steps}", progress)


# -- metrics -----------------------------------------------------------------------------------------

def real_digits(count=REAL_TOTAL):
    """`count` held-out real digits, evenly spaced over the 500 (all classes stay represented), in [-1, 1]."""
    test = Digits("test")
    idx = torch.arange(count) * len(test) // count
    return test.images[idx], test.labels[idx]


def real_features(inception, images, device, batch=50):
    """Inception features of the real set, cached in CACHE_DIR per device type (GPU convolutions round
    differently) under a SHA-1 of the images: recomputed when the data or the count change, or the cache is
    unreadable."""
    digest = hashlib.sha1(images.float().contiguous().numpy().tobytes()).hexdigest()
    path = CACHE_DIR / f"fid_digits_test_{len(images)}_{torch.device(device).type}.safetensors"
    return cached_features(path, digest, lambda: inception_features(inception, images.to(device), batch).cpu(),
                           field="images_sha1")


@dataclass
class Metrics:
    """The metric networks on `device` and the held-out real digits they compare against."""
    real: torch.Tensor           # (count, 3, 32, 32) in [-1, 1]
    inception: nn.Module
    classifier: nn.Module
    classifier_accuracy: float   # on the real digits: the ceiling of prompt accuracy
    device: torch.device


def load_metrics(device, real_count=REAL_TOTAL):
    """The Inception and the digit classifier on `device`, and `real_count` held-out digits (real_digits)."""
    device = torch.device(device)
    real, real_labels = real_digits(real_count)
    inception = load_inception().to(device)
    classifier = load_digit_classifier().to(device)
    accuracy = prompt_accuracy(real.to(device), real_labels, classifier)
    return Metrics(real, inception, classifier, accuracy, device)


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


# -- the evaluation ----------------------------------------------------------------------------------

def evaluate(pipe, rows, metrics, n, seed=0, batch=50, progress=True):
    """Generate and score every row (the student rows need the LoRA attached to pipe.denoiser, see lora_mode)
    -> results, teacher rows first."""
    real_feats = real_features(metrics.inception, metrics.real, metrics.device)
    results = []
    for row in sorted(rows, key=lambda r: r.student):          # teacher rows first
        with lora_mode(pipe, row):
            images, nfe, seconds = generate_row(pipe, row, n, seed, batch, progress)
        results.append(score(row, images, nfe, seconds, real_feats, metrics.inception, metrics.classifier,
                             metrics.device))
        print(f"eval: {row.name} {row.sampler} {row.steps} steps: FID {results[-1].fid:.2f}, prompt accuracy "
              f"{100 * results[-1].prompt_accuracy:.1f}%", file=sys.stderr)
    return results
