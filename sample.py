"""Text-to-image (and inpainting, super-resolution, adapter) from the command line: a few-step Flash sample
(or any other sampler) written as a PNG.

    python sample.py --steps 4                # the shipped digits student: a grid of the ten digits
    python sample.py --prompt "a handwritten digit 7" --steps 4 --out seven.png
    python sample.py --model path/to/sdxl --lora flash-sdxl.safetensors --prompt "a cat" --prompt "a dog"
    python sample.py --task inpaint --image digit.png --mask hole.png --prompt "a handwritten digit seven"
    python sample.py --task upscale --image small.png --upscale 4     # 8x8 -> 32x32
    python sample.py --task adapter --image edges.png --prompt "a handwritten digit three"

Reads top to bottom: parse, build (load the pipeline and any LoRAs), sample (flash.pipeline.generate), save
(one image, or a grid: a row per prompt when --batch > 1), with the prompts, seed, steps, sampler, guidance,
model and dtype in the PNG's text metadata. The default dtype is bf16 on a CPU with bf16 matrix units (AMX,
AVX512-BF16; flash/cpu.py), fp16 on CUDA, fp32 elsewhere. With no --model, the shipped default weights/digits/ is used
(recipes/digits.sh trains it) and, for the flash / lcm samplers, its Flash LoRA (flash_lora.safetensors) is
fused in; with no prompt it draws the ten digits (flash.data.caption_for(0..9)). The same seed gives the
same image as diffusers' pipeline for that model and scheduler (see flash/pipeline.py). A run draws at most
256 images (flash.cli.MAX_IMAGES), in chunks, placed in the grid as 8-bit pieces as they come; sides are
capped at 4x the model's trained size and a run that would not fit in memory is refused first (flash/budget.py).
Errors the user can cause end in one line on stderr, exit 2, before the model load where the argument alone
is wrong (numbers, --out); the PNG is written to a temporary file and renamed, so a failure leaves the old one.

Tasks (flash/tasks.py): the model's own `task` decides (a 9-channel UNet inpaints, ...); --task picks the
shipped digits demo weights/digits-TASK when there is no --model (its Flash LoRA fused for flash / lcm, as
above) and is checked against the model otherwise. --image is read at its own size, as RGB (the image to
inpaint, the low-res image to upscale) or, for an adapter taking 1 channel, as grayscale (e.g. a white-on-
black edge map); --mask is read as grayscale, white (>= 50%) = repaint, and must have the image's size. An
upscale model draws --image's size x --upscale (default 4). With no prompt, a shipped task demo gets the empty
prompt (the digits models were trained with 10% empty captions, so the image alone decides); other models
need one. The PNG shows, per prompt, the input (the mask overlaid in red, the low-res image enlarged, the
condition image) then the outputs.
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from flash.cli import (DEFAULT_LORA, DEFAULT_MODEL, DTYPES, MAX_IMAGE_SIDE, MAX_IMAGES, MAX_PROMPTS_BYTES, TASKS,
                       Parser, check_device, check_finite, check_output, check_seed, default_model, dtype_help,
                       dtype_name, parse_lora)
from flash.data import caption_for
from flash.io import CheckpointError, read_text, to_uint8, write_png
from flash.pipeline import default_guidance, generate_chunks
from flash.schedule import SAMPLERS
from weights import load_pipeline_with_loras, load_tiny_vae


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help="a diffusers pipeline folder or a single-file .safetensors checkpoint "
                      f"(default: the shipped {DEFAULT_MODEL.parent.name}/{DEFAULT_MODEL.name})")
    a("--task", choices=TASKS, help="with no --model, the shipped digits demo of the task (weights/digits-TASK); "
                                    "with --model, it must be the model's task")
    a("--prompt", action="append", default=[],
      help="a prompt; repeat the flag for several (default with the shipped model: the ten digit captions; "
           "with a shipped task demo: the empty prompt)")
    a("--prompts-file", help="a UTF-8 text file with one prompt per line (blank lines skipped), added to "
                             "--prompt; it must hold at least one")
    a("--negative-prompt", help="what to steer away from (only used with CFG, i.e. --guidance > 1)")
    a("--steps", type=int, default=4, help="number of denoiser evaluations (default: %(default)s)")
    a("--sampler", choices=SAMPLERS, default="flash",
      help="flash: the student's trained timesteps (1, 2, 4 steps); lcm: LCMScheduler's; "
           "ddim / euler / dpm++2m: the classic solvers, for teachers; on a flow model (SD3) euler is "
           "flow-matching Euler and flash the Flash student's flow timesteps (default: %(default)s)")
    a("--guidance", type=float, help="classifier-free guidance scale, <= 1 disables CFG "
                                     "(default: 0 for flash / lcm, 7.5 otherwise)")
    a("--seed", type=int, default=0, help="seed of torch.Generator('cpu'), as diffusers uses it (default: %(default)s)")
    a("--height", type=int, help="image height in pixels (default: the model's trained size; a task model's "
                                 "comes from --image)")
    a("--width", type=int, help="image width in pixels (default: the model's trained size; a task model's "
                                "comes from --image)")
    a("--batch", type=int, default=1, help=f"images per prompt (default: %(default)s); at most {MAX_IMAGES} images "
                                           "in all (prompts x batch), drawn in chunks (flash/budget.py)")
    a("--image", help="inpaint: the image; upscale: the low-res image; adapter: the condition image (e.g. an edge "
                      "map, read as grayscale for a 1-channel adapter); used at its own size")
    a("--mask", help="inpaint: the mask, the image's size, white = repaint")
    a("--upscale", type=int, choices=(2, 4), help="upscale: output = --image's size x this (default: 4)")
    a("--adapter-scale", type=float, default=1.0, help="adapter: weight of its features (default: %(default)s)")
    a("--lora", action="append", default=[], metavar="PATH[:SCALE]",
      help="a LoRA (diffusers, PEFT or kohya format) fused into the denoiser at SCALE (default 1); repeatable")
    a("--out", default="sample.png", help="output PNG, a grid when there are several images (default: %(default)s)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a("--device", default=device, help="torch device (default: %(default)s)")
    a("--dtype", choices=DTYPES, help=dtype_help(device))
    a("--tiny-vae", metavar="PATH", help="decode with this diffusers AutoencoderTiny folder (TAESD: taesd for SD1.5 / "
                                         "SD2, taesdxl for SDXL), ~20x faster than the full VAE; text-to-image only")
    return p.parse_args(argv)


def check_args(args):
    """Fail before the (slow) model load on arguments that are wrong whatever the model."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {v}")
    check_finite("--guidance", args.guidance)
    check_finite("--adapter-scale", args.adapter_scale)
    check_seed(args.seed)
    check_output(args.out, "--out", ".png")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.tiny_vae is not None and not Path(args.tiny_vae).is_dir():
        raise FileNotFoundError(f"--tiny-vae {args.tiny_vae}: no such folder")
    if args.task and args.model is None:        # a shipped demo: its task is known before the load
        check_task_args(args, args.task, default_model(args.task))
    check_device(args.device)


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        if not Path(args.prompts_file).exists():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
        text = read_text(args.prompts_file, "prompts file", limit=MAX_PROMPTS_BYTES)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {args.prompts_file}: no prompt in it (only blank lines)")
        prompts += lines
    if not prompts and args.model is None and args.task:     # a shipped task demo: the image alone decides
        prompts = [""]
    if not prompts and args.model is None:      # the shipped digits model: one image per digit
        prompts = [caption_for(d) for d in range(10)]
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if len(prompts) * args.batch > MAX_IMAGES:
        raise ValueError(f"{len(prompts)} prompt{'s' * (len(prompts) > 1)} x --batch {args.batch} = "
                         f"{len(prompts) * args.batch} images; one run draws at most {MAX_IMAGES} (one grid)")
    return prompts


def build(args):
    """Load the pipeline, cast and move it, and fuse the LoRAs into the denoiser."""
    model = Path(args.model) if args.model else default_model(args.task)
    specs = list(args.lora)
    if args.model is None and args.sampler in ("flash", "lcm") and (model / DEFAULT_LORA).is_file():
        specs.insert(0, str(model / DEFAULT_LORA))      # the shipped student; other samplers get the teacher
    args.lora = specs                                   # as used, for the PNG metadata
    loras = [parse_lora(spec) for spec in specs]
    for path, _ in loras:
        if not Path(path).exists():
            raise FileNotFoundError(f"--lora {path}: no such file or folder")
    # fused: several LoRAs stack, and sampling pays nothing for them
    args.dtype = dtype_name(args.dtype, args.device)    # as used, for the PNG metadata
    pipe = load_pipeline_with_loras(model, DTYPES[args.dtype], args.device, loras, fuse=True)
    if args.tiny_vae:
        pipe.use_tiny_vae(load_tiny_vae(args.tiny_vae, DTYPES[args.dtype]).to(args.device))
    return pipe, model


# -- tasks: the condition images ------------------------------------------------------------------

def check_task_args(args, task, model):
    """The task flags against the model's task (pipe.task)."""
    if args.task and args.task != task:
        raise ValueError(f"--task {args.task}: --model {model} is a model for {task}")
    takes = {"text-to-image": (), "inpaint": ("--image", "--mask"), "upscale": ("--image", "--upscale"),
             "adapter": ("--image",)}[task]
    for flag, value in (("--image", args.image), ("--mask", args.mask), ("--upscale", args.upscale)):
        if value and flag not in takes:
            what = f"takes {' and '.join(takes)}" if takes else "takes no --image, --mask or --upscale"
            raise ValueError(f"{flag}: {model} is a model for {task}, which {what}")
        if not value and flag in takes and flag != "--upscale":
            raise ValueError(f"{flag}: missing; {model} is a model for {task}, which needs it")


def read_image(path, flag, mode):
    """An image file -> (1, C, H, W) floats in [0, 1] (mode "RGB" or "L")."""
    try:
        with Image.open(path) as im:
            size = im.size                          # from the header: a huge image is refused undecoded
            x = np.asarray(im.convert(mode), dtype=np.float32) / 255 if max(size) <= MAX_IMAGE_SIDE else None
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{flag} {path}: not a readable image ({type(e).__name__})") from None
    if x is None:
        raise ValueError(f"{flag} {path}: {size[0]}x{size[1]} pixels, over {MAX_IMAGE_SIDE} a side")
    x = torch.from_numpy(x)
    return (x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]).contiguous()


def read_condition(args, pipe, model):
    """-> (generate's condition kwargs, a picture of the input (1, 3, H, W) or None) for pipe.task."""
    task = pipe.task
    check_task_args(args, task, model)
    if task == "text-to-image":
        return {}, None
    gray = task == "adapter" and pipe.adapter is not None and pipe.adapter.config.in_channels == 1
    image = read_image(args.image, "--image", "L" if gray else "RGB")
    if task == "adapter":
        return {"adapter_image": image, "adapter_scale": args.adapter_scale}, image.expand(-1, 3, -1, -1)
    if task == "upscale":
        factor = args.upscale or 4
        return {"image": image, "upscale": factor}, image.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    mask = read_image(args.mask, "--mask", "L")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"--mask {args.mask}: {mask.shape[-1]}x{mask.shape[-2]} pixels, the --image "
                         f"{args.image} has {image.shape[-1]}x{image.shape[-2]}; they must match")
    repaint = (mask >= 0.5).float()          # as generate binarizes it
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return {"image": image, "mask": mask}, image * (1 - repaint / 2) + red * repaint / 2


def grid_layout(n, prompts, batch, picture):
    """-> (rows, columns, cell(i) = (row, column) of output image i). With a task's input picture, a row
    per prompt: the input, then its outputs; else row-major, a row per prompt when --batch > 1."""
    if picture is not None:
        return len(prompts), batch + 1, lambda i: (i // batch, i % batch + 1)
    cols = batch if len(prompts) > 1 and batch > 1 else math.ceil(math.sqrt(n))
    cols = 5 if n == 10 else cols                 # the ten digits as 2 rows of 5, not 4 x 3 with 2 holes
    return math.ceil(n / cols), cols, lambda i: divmod(i, cols)


def save(chunks, args, prompts, model, guidance, picture=None, task="text-to-image"):
    """Place the images of each chunk (generate_chunks) in one uint8 grid as they come (black padding), then
    write the PNG atomically -> (path, number of images, (width, height))."""
    n = len(prompts) * args.batch
    rows, cols, cell = grid_layout(n, prompts, args.batch, picture)
    grid, done = None, 0
    for chunk in chunks:
        for piece in to_uint8(chunk):
            if grid is None:
                h, w = piece.shape[:2]
                grid = np.zeros((rows * h, cols * w, 3), np.uint8)
                for r in range(rows if picture is not None else 0):
                    grid[r * h:(r + 1) * h, :w] = to_uint8(picture[0])
            r, c = cell(done)
            grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = piece
            done += 1
    info = PngInfo()
    task_meta = [("task", task), ("image", args.image), ("mask", args.mask or ""), ("upscale", args.upscale or ""),
                 ("adapter_scale", args.adapter_scale)] if task != "text-to-image" else []
    for key, value in task_meta + [("prompt", "\n".join(prompts)), ("negative_prompt", args.negative_prompt or ""),
                       ("seed", args.seed), ("steps", args.steps), ("sampler", args.sampler),
                       ("guidance", guidance), ("batch", args.batch), ("model", str(model)),
                       ("lora", " ".join(args.lora)), ("dtype", args.dtype), ("tiny_vae", args.tiny_vae or "")]:
        info.add_text(key, str(value))
    write_png(grid, args.out, pnginfo=info)
    return Path(args.out), done, (w, h)


def main(argv=None):
    args = parse_args(argv)
    if args.model is None and not default_model(args.task).exists():
        print(f"error: the shipped default model {default_model(args.task)} is not built yet; pass --model PATH",
              file=sys.stderr)
        return 1
    try:
        check_args(args)
        prompts = read_prompts(args)
        pipe, model = build(args)
        condition, picture = read_condition(args, pipe, model)
        guidance = default_guidance(args.sampler) if args.guidance is None else args.guidance
        chunks = generate_chunks(pipe, prompts, steps=args.steps, sampler=args.sampler, guidance=guidance,
                                 height=args.height, width=args.width, seed=args.seed,
                                 negative_prompt=args.negative_prompt, batch=args.batch, kept=1, **condition)
        out, n, (w, h) = save(chunks, args, prompts, model, guidance, picture, pipe.task)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({n} image{'s' * (n > 1)}, {w}x{h})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
