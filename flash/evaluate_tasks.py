"""The digits evaluation of an inpainting, super-resolution ("upscale") or adapter model (flash/tasks.py) on
the held-out digits, teacher against Flash student, as a markdown table (eval.py --task is its command
line). It reuses flash/evaluate.py's pieces: the per-image seeds, the timed batches, the cached real
features, the LoRA rule of the rows.

Protocol (fixed, so a rerun reproduces the numbers; flash/evaluate.py's rules otherwise):
- Input i (i = 0..n-1, n <= 500) is held-out digit i (flash.data.Digits("test"), in its stored order, so the
  classes are mixed), prompted with flash.data.caption_for(its label). Its torch.Generator("cpu"), seeded
  with seed * 2^20 + i, first draws the task input with flash.tasks.task_inputs (inpaint: one random box
  mask, 30-70% of each side; upscale: nothing, the low-res image is the digit area-downsampled by the factor;
  adapter: nothing, the condition is the digit's Sobel edge map), then goes on, in every row, to draw that
  image's noise (and the inpainting posterior sample, and any sampler re-noising). So every row sees the
  same inputs and starts image i from the same noise, whatever the batch.
- FID as flash/evaluate.py (the n outputs against the real held-out digits). For inpainting the FID and
  accuracy are of the COMPOSITES (the original outside the hole, the output inside), what an inpainting user
  keeps; their unmasked pixels are the held-out digits themselves, so the FID is lower than a text-to-image
  one and compares inpainting rows with each other only.
- Prompt accuracy: the shipped digit classifier on the outputs (composites), as flash/evaluate.py.
- inpaint: PSNR inside the hole: per image, 10 log10(1 / MSE) over the masked pixels (images in [0, 1]),
  averaged over images; how close the fill comes to the digit that was there (a plausible fill of another
  shape is penalised: read it together with FID).
- upscale: PSNR of the whole output against the held-out high-resolution digit, averaged over images;
  rows for each factor (2: 16 -> 32 px, 4: 8 -> 32 px), including a bicubic baseline without a model
  (flash.tasks.upsample, the image the model is conditioned on; NFE 0).
- adapter: edge agreement, the mean per-image F1 of flash.tasks.edge_map(output) against the input edge map
  on exact pixels (flash.tasks.edge_agreement), at adapter scale 1. Centred digits share many edge pixels
  on a 32 px canvas, so the F1 has a high floor: the "same class" baseline row scores, as the output for
  input i, the next held-out digit of the same class (no model; NFE 0), i.e. what a model that draws the
  right digit but ignores the edges would get.
- NFE per image and seconds per image as flash/evaluate.py (the task condition's VAE encode counts in the
  time).
The rows of the task tables in docs/results.md (readme_rows): the teacher with DPM-Solver++ 2M at 25 and 4 steps with CFG (default 3; the
image condition is in both CFG branches) and the Flash student (the teacher + its LoRA) at 4 and 2 steps
without CFG; for upscale, preceded by the bicubic row, for each factor; for adapter, by the same-class row.
Every task's table starts with a "VAE reconstruction" row: the held-out digit itself encoded and decoded (posterior
mean; for inpainting composited like the outputs), the reference for models that decode through this VAE:
on the digits VAE its FID against the real digits is ~61 (a model need not reproduce the reconstructions'
artefacts, so its FID can come out lower, but PSNR near it is as close as the VAE lets an output get).
"""
import sys
from dataclasses import dataclass

import torch

from flash.data import Digits, caption_for
from flash.evaluate import TEACHER_GUIDANCE, Result, Row, image_seed, lora_mode, real_features, timed_batches
from flash.metrics import fid_from_features, inception_features, prompt_accuracy
from flash.pipeline import generate
from flash.tasks import UPSCALE_FACTORS, edge_agreement, edge_map, task_inputs, upsample

METRIC = {"inpaint": ("psnr", "PSNR in hole (dB)"), "upscale": ("psnr", "PSNR (dB)"),
          "adapter": ("edge_f1", "edge F1")}


@dataclass
class TaskRow(Row):              # flash/evaluate.py's row plus the upscale factor
    factor: int = None           # upscale only


def readme_rows(task, guidance=TEACHER_GUIDANCE, factors=UPSCALE_FACTORS):
    def model_rows(factor=None):
        return [TaskRow("teacher", "dpm++2m", 25, guidance, factor=factor),
                TaskRow("teacher", "dpm++2m", 4, guidance, factor=factor),
                *(TaskRow("Flash student", "flash", s, 0.0, True, factor) for s in (4, 2))]
    vae = TaskRow("VAE reconstruction", "vae", 0, 0.0)       # the reference of models decoding through the VAE
    if task == "adapter":
        return [TaskRow("same class, other digit", "real", 0, 0.0), vae, *model_rows()]
    if task != "upscale":
        return [vae, *model_rows()]
    return [vae] + [row for f in factors for row in (TaskRow("bicubic", "bicubic", 0, 0.0, factor=f), *model_rows(f))]


# -- inputs and generation ---------------------------------------------------------------------------

@dataclass
class Inputs:
    images: torch.Tensor         # (n, 3, H, W) the held-out digits in [-1, 1]
    labels: list
    prompts: list
    kwargs: dict                 # flash.pipeline.generate's condition arguments, one row per image
    states: list                 # each image's generator state after its input was drawn
    same_class: torch.Tensor     # (n, 3, H, W) for input i the next held-out digit of its class, in [-1, 1]


def make_inputs(task, n, seed=0, factor=2):
    """The task inputs of held-out digits 0..n-1 (module docstring), one generator per image."""
    test = Digits("test")
    images, labels = test.images[:n], test.labels[:n].tolist()
    per_image, states = [], []
    for i in range(n):
        g = torch.Generator("cpu").manual_seed(image_seed(seed, i))
        per_image.append(task_inputs(task, images[i:i + 1], g, factor)[0])
        states.append(g.get_state())
    kwargs = {k: torch.cat([kw[k] for kw in per_image]) if torch.is_tensor(v) else v
              for k, v in per_image[0].items()}
    total = len(test)
    other = [next(j % total for j in range(i + 1, i + total) if test.labels[j % total] == test.labels[i])
             for i in range(n)]
    return Inputs(images, labels, [caption_for(label) for label in labels], kwargs, states, test.images[other])


def generate_row(pipe, row, inputs, batch=50, progress=True):
    """The row's outputs for all inputs -> (images (n, 3, H, W) in [0, 1], NFE per image, seconds)."""
    n = len(inputs.images)

    def condition(first, count):
        return {k: v[first:first + count] if torch.is_tensor(v) else v for k, v in inputs.kwargs.items()}

    def run(first, count):
        if row.sampler == "bicubic":         # the baselines: the upsampled low-res image itself, ...
            return (upsample(condition(first, count)["image"] * 2 - 1, inputs.images.shape[-1]) + 1) / 2
        if row.sampler == "real":            # ... or another real digit of the class, ...
            return (inputs.same_class[first:first + count] + 1) / 2
        if row.sampler == "vae":             # ... or the digit itself through the VAE (posterior mean)
            vae = pipe.vae
            x = inputs.images[first:first + count].to(next(vae.parameters()))
            with torch.no_grad():
                return (vae.decode(vae.encode(x).mean).float().clamp(-1, 1) + 1) / 2
        gens = []
        for state in inputs.states[first:first + count]:
            g = torch.Generator("cpu")
            g.set_state(state)
            gens.append(g)
        return generate(pipe, inputs.prompts[first:first + count], steps=row.steps, sampler=row.sampler,
                        guidance=row.guidance, generator=gens, progress=False, **condition(first, count))

    desc = f"{row.name} {row.sampler} {row.steps}" + (f" x{row.factor}" if row.factor else "")
    return timed_batches(pipe, run, n, batch, desc, progress)


# -- metrics -----------------------------------------------------------------------------------------

def psnr(x, y, weight=None):
    """Per-image PSNR in dB of images in [0, 1], over the pixels where weight (B, 1, H, W) is 1 -> (B,)."""
    err = (x.float() - y.float()).square()
    w = torch.ones_like(err) if weight is None else weight.float().expand_as(err)
    mse = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))         # identical images: 100 dB, not infinity


@dataclass
class TaskResult(Result):        # flash/evaluate.py's row result plus the task's own measures
    task: str
    factor: int = None           # upscale
    psnr: float = None           # inpaint (inside the hole), upscale (whole image)
    edge_f1: float = None        # adapter


def score(task, row, images, inputs, nfe, seconds, real_feats, inception, classifier, device, batch=50):
    original = (inputs.images.float() + 1) / 2
    extra = {}
    if task == "inpaint":
        mask = inputs.kwargs["mask"]
        images = original * (1 - mask) + images * mask                 # the composite
        extra["psnr"] = psnr(images, original, mask).mean().item()
    elif task == "upscale":
        extra["psnr"] = psnr(images, original).mean().item()
    else:
        extra["edge_f1"] = edge_agreement(edge_map(images * 2 - 1), inputs.kwargs["adapter_image"]).mean().item()
    x = (images * 2 - 1).to(device)
    fid = fid_from_features(inception_features(inception, x, batch).cpu(), real_feats)
    acc = prompt_accuracy(x, torch.tensor(inputs.labels), classifier)
    n = len(images)
    return TaskResult(row.name, row.sampler, row.steps, row.guidance, n, nfe, fid, acc, seconds / n,
                      n / seconds, task, row.factor, **extra)


def table(task, results, classifier_accuracy, real_count):
    key, head = METRIC[task]
    factor = task == "upscale"
    lines = ["| model | sampler | steps | CFG | " + "factor | " * factor +
             f"NFE / image | {head} | FID | prompt accuracy | s / image | images / s |",
             "|---|---|---:|---:|" + "---:|" * (6 + factor)]
    for r in results:
        cfg = f"{r.guidance:g}" if r.guidance > 1 else "-"
        value = getattr(r, key)
        value = f"{value:.2f}" if key == "psnr" else f"{value:.3f}"
        speed = (f"{r.seconds_per_image:.4f} | {r.images_per_second:.1f}" if r.nfe_per_image
                 else "- | -")                  # the baseline rows run no model
        factor_cell = (f"{r.factor}x | " if r.factor else "- | ") * factor
        lines.append(f"| {r.name} | {r.sampler} | {r.steps or '-'} | {cfg} | {factor_cell}"
                     f"{r.nfe_per_image:g} | {value} | {r.fid:.2f} | {100 * r.prompt_accuracy:.1f}% | {speed} |")
    n = results[0].n if results else 0
    what = {"inpaint": "composites (original outside the hole, output inside)", "upscale": "outputs",
            "adapter": "outputs"}[task]
    lines.append(f"\n{task}: the first {n} held-out digits as inputs. FID: the {what} vs {real_count} "
                 f"held-out real digits (TF-FID Inception). Prompt accuracy: the digit classifier, "
                 f"{100 * classifier_accuracy:.1f}% on the held-out real digits.")
    return "\n".join(lines)


# -- the evaluation ----------------------------------------------------------------------------------

def evaluate_task(pipe, task, rows, metrics, n, seed=0, batch=50, progress=True):
    """Generate and score every row on the first n held-out digits (the student rows need the LoRA attached
    to pipe.denoiser, see flash.evaluate.lora_mode) -> results in the order of `rows`; the teacher rows run
    first. Upscale rows are made from the inputs of their factor."""
    factors = sorted({row.factor for row in rows if row.factor}) or [None]
    real_feats = real_features(metrics.inception, metrics.real, metrics.device)
    inputs = {f: make_inputs(task, n, seed, f or 2) for f in factors}

    results = {}

    def source(row):            # the VAE row reads only the digits: any factor's inputs do
        return inputs[row.factor if row.factor in inputs else factors[0]]

    for i in sorted(range(len(rows)), key=lambda i: rows[i].student):   # teacher rows first
        row = rows[i]
        with lora_mode(pipe, row):
            images, nfe, seconds = generate_row(pipe, row, source(row), batch, progress)
        results[i] = score(task, row, images, source(row), nfe, seconds, real_feats, metrics.inception,
                           metrics.classifier, metrics.device)
        r, (key, head) = results[i], METRIC[task]
        print(f"eval: {task} {row.name} {row.sampler} {row.steps} steps{f' x{row.factor}' if row.factor else ''}: "
              f"{head} {getattr(r, key):.3f}, FID {r.fid:.2f}, prompt accuracy {100 * r.prompt_accuracy:.1f}%",
              file=sys.stderr)
    return [results[i] for i in range(len(rows))]
