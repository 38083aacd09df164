"""The pictures of the task demos (docs/results.md): for 10 held-out digits (one per class), the rows

    input (the hole in grey / the low-res image / the edge map), teacher 25 steps (DPM-Solver++ 2M, CFG 3),
    Flash student 4 steps (no CFG), the original digit

each column from the same initial noise. Super-resolution gets a block per factor (2x, 4x).

    python recipes/digits_tasks_picture.py --model weights/digits-inpaint --out runs/digits-tasks/inpaint/picture.png
    python recipes/digits_tasks_picture.py --stack docs/digits_tasks.png runs/digits-tasks/inpaint runs/digits-tasks/upscale
    python recipes/digits_tasks_picture.py --examples docs/examples      # the README's sample.py inputs
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.cli import DEFAULT_LORA  # noqa: E402
from flash.data import Digits, caption_for  # noqa: E402
from flash.io import write_png  # noqa: E402
from flash.lora import lora_disabled  # noqa: E402
from flash.pipeline import generate  # noqa: E402
from flash.tasks import downsample, edge_map, task_inputs  # noqa: E402
from weights import load_pipeline_with_loras  # noqa: E402

SCALE = 2          # nearest-neighbour zoom of the 32 px digits


def held_out_examples():
    """The first held-out digit of each class, 0 to 9."""
    data = Digits("test")
    idx = [int((data.labels == d).nonzero()[0]) for d in range(10)]
    return data.images[idx], [caption_for(d) for d in range(10)]


def rows_for(pipe, images, prompts, factor):
    kw, shown = task_inputs(pipe.task, images, torch.Generator().manual_seed(0), factor=factor)

    def run(sampler, steps, guidance):
        gens = [torch.Generator().manual_seed(1000 + d) for d in range(len(prompts))]
        return generate(pipe, prompts, steps=steps, sampler=sampler, guidance=guidance, generator=gens,
                        progress=False, **kw)
    with lora_disabled(pipe.denoiser):          # the teacher: the LoRA attached but switched off
        teacher = run("dpm++2m", 25, 3.0)
    return [shown, teacher, run("flash", 4, 0.0)]


def picture(model):
    # the LoRA attached, not fused: rows_for switches it off for the teacher
    pipe = load_pipeline_with_loras(model, loras=[(Path(model) / DEFAULT_LORA, 1.0)], fuse=False)
    images, prompts = held_out_examples()
    rows = []
    for factor in ((2, 4) if pipe.task == "upscale" else (2,)):
        rows += rows_for(pipe, images, prompts, factor)
    rows.append((images + 1) / 2)
    grid = torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1)
    return to_image(grid)


def to_image(grid):
    img = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def stack(out, runs):
    """The tasks' pictures one under the other, separated by a white band."""
    parts = [Image.open(Path(r) / "picture.png").convert("RGB") for r in runs]
    band = 8
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + band * (len(parts) - 1)),
                       "white")
    y = 0
    for p in parts:
        canvas.paste(p, (0, y))
        y += p.height + band
    write_png(canvas, out)
    return out


def examples(folder):
    """sample.py inputs made from the held-out digit 7: digit.png, hole.png (white = repaint), small.png
    (8 px, for --upscale 4) and edges.png (its edge map)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = held_out_examples()
    seven = images[7:8]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 12:26, 6:22] = 1
    for name, x in (("digit", (seven + 1) / 2), ("hole", mask), ("small", (downsample(seven, 4) + 1) / 2),
                    ("edges", edge_map(seven))):
        arr = (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        write_png(arr[..., 0] if arr.shape[-1] == 1 else arr, folder / f"{name}.png")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a shipped task folder (with flash_lora.safetensors)")
    p.add_argument("--out", help="PNG to write")
    p.add_argument("--stack", nargs="+", metavar=("OUT", "RUN"), help="stack RUN/picture.png files into OUT")
    p.add_argument("--examples", metavar="DIR", help="write the README's sample.py input images into DIR")
    args = p.parse_args(argv)
    if args.examples:
        print(f"wrote {examples(args.examples)}")
        return 0
    if args.stack:
        print(f"wrote {stack(args.stack[0], args.stack[1:])}")
        return 0
    if not (args.model and args.out):
        p.error("--model and --out are needed (or --stack OUT RUN...)")
    write_png(picture(args.model), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
