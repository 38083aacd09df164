"""Fixtures for the training tests: tiny SD1.5-, SDXL- and PixArt-like pipeline folders saved by diffusers (the
oracle; built from tests/helpers.py's components), a handful of tiny captioned images, and a runner for train.py
(or its test-hook wrapper, tests/train_faults.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from PIL import Image
from safetensors.torch import load_file

from helpers import ROOT, hf_clip_tokenizer, make_pixart, randomize, tiny_clip, tiny_unet, tiny_vae

SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}


def make_tiny_sd(folder):
    """SD1.5-like pipeline: VAE with 2 levels (f = 2), UNet (16, 32) with cross-attention at both levels
    (mid block 32 x 4 x 4 at 16 px), CLIP with 2 layers of width 16 and the real 49,408-token vocabulary."""
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(vae=tiny_vae(1), text_encoder=tiny_clip(2, 16, eos=49407),
                                   tokenizer=hf_clip_tokenizer(), unet=tiny_unet(3, 16, attention_head_dim=2),
                                   scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def make_images(folder, n=8, size=16, seed=0):
    """n random-blob RGB images with same-named .txt captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "dark", "bright", "round", "square", "striped"]
    for k in range(n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{k:02d}.png")
        (folder / f"img{k:02d}.txt").write_text(f"a {words[k % len(words)]} thing number {k}")
    return folder


def run_train(args, nproc=1, fault=None, check=True, timeout=300, background=False, script=None):
    """Run train.py on CPU (through torchrun when nproc > 1) with one thread per process: on this shared 2-core
    machine OpenMP barriers in 2-thread ops stall for whole time slices. A fault (FLASH_TRAIN_FAULT) or
    --check-sync runs tests/train_faults.py, train.py with those test hooks, in its place (`script`: another
    such wrapper). Returns the CompletedProcess (or the Popen with background=True)."""
    hooked = fault or "--check-sync" in [str(a) for a in args]
    cmd = [sys.executable, str(script or (ROOT / "tests" / "train_faults.py" if hooked else ROOT / "train.py"))]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {k: v for k, v in os.environ.items() if k != "FLASH_TRAIN_FAULT"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **({"FLASH_TRAIN_FAULT": fault} if fault else {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))   # the wrapper imports train
    cmd += [str(a) for a in args]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def read_tensors(path):
    return load_file(str(path))


def make_tiny_sdxl(folder):
    """SDXL-like: two CLIPs (16 and 24 wide, the second with a 20-d projection = pooled), text_time ids."""
    torch.manual_seed(0)
    unet = randomize(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8, cross_attention_dim=40,
        attention_head_dim=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=20 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), 7)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(4, scaling_factor=0.13025, force_upcast=True),
                                     text_encoder=tiny_clip(5, 16, eos=49407),
                                     text_encoder_2=tiny_clip(6, 24, projection=20, eos=49407),
                                     tokenizer=hf_clip_tokenizer(), tokenizer_2=hf_clip_tokenizer("!"), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def make_tiny_pixart(folder):
    """PixArt-like (tests/helpers.py: T5 16 wide, a 2-block DiT at sample_size 128, so the 1024-MS resolution /
    aspect-ratio conditions are on; train at --resolution 16)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    make_pixart(folder, t5_buckets=8)
    return folder
