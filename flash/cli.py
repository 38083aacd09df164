"""What the command-line scripts (sample.py, eval.py, train.py) share: the one-line argparse error, the
dtype names and their default, and where the shipped demo models live."""
import argparse
from pathlib import Path

import torch

from flash.cpu import default_dtype_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "weights" / "digits"          # the shipped default (recipes/digits.sh trains it)
DEFAULT_LORA = "flash_lora.safetensors"              # inside a shipped model folder: its Flash student
TASKS = ("inpaint", "upscale", "adapter")            # beyond text-to-image: shipped as weights/digits-TASK
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    """"path" or "path:scale" (a trailing ":number"; other colons belong to the path)."""
    path, _, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0
