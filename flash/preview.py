"""The picture a training run saves as it goes: a grid of samples, a row per prompt and a column per
sampler setting, every column drawn from the same initial noise so that the columns differ only by the
model and the sampler (e.g. a distilled student at 1, 2 and 4 steps beside its teacher at 25).
"""
import torch

from flash.io import to_uint8, write_png
from flash.pipeline import generate
from flash.seeds import GRID, generator
from flash.tasks import task_inputs


def sample_grid(pipe, images, prompts, columns, size, seed, path):
    """Save a PNG to `path`: a row per prompt; [a first column with the task's input made from `images`
    (a masked or downsampled copy, an edge map), then] a column per (model, sampler, steps, guidance), each
    generated under the context manager `model()` (which may change the pipeline's denoiser)."""
    task_kw, shown = task_inputs(pipe.task, images.to(pipe.device), generator(seed, GRID))
    out = [] if shown is None else [shown.cpu()]
    for model, sampler, steps, guidance in columns:
        with model():
            out.append(generate(pipe, prompts, steps=steps, sampler=sampler, guidance=guidance, height=size,
                                width=size, progress=False, generator=generator(seed, GRID), **task_kw).cpu())
    grid = torch.cat([torch.cat([col[r] for col in out], dim=2) for r in range(len(prompts))], dim=1)
    write_png(to_uint8(grid), path)
