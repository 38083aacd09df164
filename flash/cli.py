"""What the command-line scripts (sample.py, eval.py, train.py) share: the one-line argparse error, the
dtype names and their default, where the shipped demo models live, and the up-front checks of numbers and
output paths (so that a bad value fails in one line before the model load, not after the work)."""
import argparse
import math
import os
from pathlib import Path

import torch

from flash.cpu import default_dtype_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "weights" / "digits"          # the shipped default (recipes/digits.sh trains it)
DEFAULT_LORA = "flash_lora.safetensors"              # inside a shipped model folder: its Flash student
TASKS = ("inpaint", "upscale", "adapter")            # beyond text-to-image: shipped as weights/digits-TASK
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_IMAGES = 256                                     # images of one sample.py run (prompts x --batch, one grid)
MAX_PROMPTS_BYTES = 1 << 20                          # a --prompts-file
MAX_IMAGE_SIDE = 8192                                # a condition image (--image, --mask), before decoding it


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`PREFIX error: message (see PROG --help)`, exit 2) instead of the
    usage block; `prefix` is what the script's other errors start with."""

    def __init__(self, *args, prefix="", **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def error(self, message):
        self.exit(2, f"{self.prefix}error: {message} (see {self.prog} --help)\n")


def default_model(task=None):
    """The shipped digits model folder, or its task demo weights/digits-TASK."""
    return DEFAULT_MODEL.parent / f"digits-{task}" if task else DEFAULT_MODEL


def check_device(name):
    """The --device value as a torch.device that exists here, or a one-line ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def dtype_name(name, device, cpu_bf16=True):
    """The --dtype name, or its default on `device` (flash.cpu.default_dtype_name): fp16 on CUDA, bf16 on a
    CPU with native bf16 matrix units (unless `cpu_bf16` is False: eval.py's reference rows stay fp32), fp32
    elsewhere."""
    default = default_dtype_name(device)
    return name or ("fp32" if default == "bf16" and not cpu_bf16 else default)


def dtype_help(device):
    """--dtype's help, naming the default this machine gets."""
    return (f"weights dtype (default: fp16 on CUDA, bf16 on CPUs with bf16 matrix units (AMX / AVX512-BF16), "
            f"fp32 elsewhere; here: {dtype_name(None, device)})")


def parse_lora(spec):
    """"path" or "path:scale" (a trailing ":number"; other colons belong to the path). A non-finite scale
    (path:nan, path:inf) is a one-line ValueError."""
    path, _, scale = spec.rpartition(":")
    try:
        parsed = (path, float(scale)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0
    check_finite(f"--lora {spec}: the scale", parsed[1])
    return parsed


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1      # what torch.Generator.manual_seed takes


def check_finite(flag, value):
    """A number that must be finite (guidance, scales): NaN or inf would blacken every image silently."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")


def check_seed(seed, flag="--seed"):
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{flag} must be in [-2**63, 2**64 - 1] (torch.Generator's range), got {seed}")


def check_output(path, flag, suffix=None):
    """An output file path checked before any work: not a folder or another non-regular file, in a folder
    that exists or can be made (no file in the way) and that this user can write (the file is written
    beside and renamed over, flash.io.atomic_path). suffix: the extension it must have (".png")."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} must name a {suffix} file, got {path}")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; name a file")
    if path.exists() and not path.is_file():
        raise ValueError(f"{flag} {path}: exists and is not a regular file")
    folder = path.parent
    while not folder.exists():           # the nearest existing ancestor decides whether mkdir can work
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")
