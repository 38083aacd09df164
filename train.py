"""Train a denoiser: Flash Diffusion distillation (`--objective flash`) or plain denoising training and
fine-tuning (`--objective diffusion`, e.g. the digits teacher); or the pipeline's autoencoder (`--objective
vae`, the first stage of recipes/digits.sh). One process or `torchrun --nproc_per_node=N` (flash, diffusion):

    torchrun --nproc_per_node=2 train.py --model PIPELINE --data FOLDER|digits --out runs/x [options]

Paper: Chadebec et al., "Flash Diffusion" (arXiv 2406.02347); docs/method.md has every number and the
algorithm; the losses are pure functions in flash/losses.py. Design choices and deviations from the
authors' reference code:
- ONE copy of the base weights: the student is the denoiser plus a LoRA adapter, the teacher the same module
  inside `lora_disabled`, the DMD fake score the student itself (no grad, no CFG), the discriminator the
  teacher's mid-block features plus a trainable head. The reference deep-copies the model; here only
  --full-finetune does (the teacher is then a frozen copy).
- No DDP wrapper: in one step the same module is student (with grad), teacher, fake score and a frozen
  feature extractor that gradients flow through, while DDP hooks every backward reaching its parameters and
  expects one forward per backward. The trainable gradients are instead averaged by an explicit all-reduce
  after the accumulation micro-batches (what DDP + no_sync computes), from weights broadcast by rank 0.
- Randomness is a function of (seed, step) and (seed, sample position), never a carried stream. The grid
  index and guidance scales come from (seed, step), shared by all ranks (one index per batch); per-sample
  draws (VAE posterior, x_t noise, DMD / GAN taus and noises, caption dropout, Digits' random captions) from
  (seed, position), position s*G + r*accum*b + m*b + j for sample j of micro-batch m on rank r at step s.
  So N ranks x batch b equals one process x batch N*b or accumulation, and --resume redraws exactly.
- The phase counter counts batches and is saved (the reference counted forward calls, and forgot it on
  resume). DMD / GAN re-noising uses the true tau; --reference-quirks restores the reference's t=30 noise
  and, for PixArt, its discriminator on the model output instead of the middle block.
- Tasks beyond text-to-image (flash/tasks.py) come with the pipeline (`pipe.task`): an inpainting or
  super-resolution UNet gets its image condition (`concat`: a random box mask + the masked-image latent, or
  the latent of the image downsampled 2x or 4x and bicubic-upsampled back), an adapter pipeline the T2I-Adapter
  features of the image's edge map. The condition goes to every call of both CFG branches (teacher, student,
  DMD, discriminator); only the text is dropped. `--objective diffusion` on an adapter pipeline trains the
  adapter alone, the UNet frozen (as T2I-Adapter is trained); `--objective flash` keeps the adapter frozen.
- `--objective vae` is a short separate loop (section 9): one process, no resume; it ends by writing the
  latent scaling_factor = 1 / std of the encoded training latents into the saved VAE config.
- Test hooks, env FLASH_TRAIN_FAULT: "kill-step:N" (SIGKILL in step N), "kill-write:N" (while writing the
  checkpoint taken after N steps), "kill-swap:N" (between the renames publishing it), "nan:N,M" (NaN losses).
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from flash.cli import Parser
from flash.data import DIGITS_FILE, Digits, ImageCaptionFolder
from flash.lora import DEFAULT_TARGETS, PIXART_TARGETS, inject_lora, lora_disabled, mark_only_lora_trainable, save_lora
from flash.losses import (DEFAULTS, DiscriminatorHead, Phase, discriminator_loss, distillation_loss, dmd_loss,
                          dmd_renoise_timesteps, gan_timesteps, generator_loss, mixture_pmf, noisy_latent, phase_at,
                          renoise, sample_grid_index, student_output, teacher_target)
from flash.pipeline import ENCODERS, denoiser_kwargs, encode_prompt, generate
from flash.schedule import SCHEDULES, NoiseSchedule, cfg, timesteps
from flash.tasks import (UPSCALE_FACTORS, downsample, edge_map, encode, extra_channels, inpaint_condition,
                         random_masks, task_inputs, upsample)
from weights import CheckpointError, load_pipeline, read_safetensors, write_safetensors
from weights.save import save_component, save_pipeline

# ----------------------------------------------------------------------------------------------------
# 1. Config and command line

# LoRA rank, alpha, targets of the released adapters (method.md, LoRA); the rest per backbone: losses.DEFAULTS.
LORA_DEFAULTS = {"sd15": (128, 128.0, DEFAULT_TARGETS), "sdxl": (64, 64.0, DEFAULT_TARGETS),
                 "pixart": (64, 8.0, PIXART_TARGETS)}
TERMS = ("distill", "dmd", "gen", "disc", "diffusion")


def numbers(text):
    return [float(v) for v in text.split(",")]


def parse_args(argv=None):
    p = Parser(prefix="train.py: ", description="Flash Diffusion distillation / diffusion training (docs/method.md)")
    a = p.add_argument
    a("--model", required=True, help="pipeline folder (SD1.5, SDXL, PixArt) or single-file checkpoint")
    a("--data", required=True, help="folder of images with .txt captions (or captions.jsonl), or 'digits'")
    a("--out", default="runs/train", help="log.jsonl, checkpoint-last/, samples/, final/")
    a("--objective", choices=("flash", "diffusion", "vae"), default="flash")
    a("--resolution", type=int, help="image side (default: the denoiser's sample_size x VAE factor)")
    a("--steps", type=int, default=10000, help="optimiser steps (batches)")
    a("--batch-size", type=int, default=4, help="per rank and per micro-batch")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--lr", type=float, help="default 1e-5 (flash, method.md) or 1e-4 (diffusion)")
    a("--disc-lr", type=float, help="discriminator head learning rate (default: --lr)")
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=0.0, help="max student gradient norm (0: off, as the reference)")
    a("--seed", type=int, default=0)
    a("--full-finetune", action=argparse.BooleanOptionalAction, default=None,
      help="train every weight (teacher = frozen copy); default: LoRA for flash, full for diffusion")
    a("--lora-rank", type=int), a("--lora-alpha", type=float)
    a("--lora-targets", nargs="+", help="module name suffixes (default per family, method.md)")
    a("--K", type=int, help="teacher grid size (32 SD/SDXL, 16 PixArt)")
    a("--guidance", type=float, nargs=2, metavar=("MIN", "MAX"), help="teacher guidance range U[MIN, MAX]")
    a("--phase-len", type=int, help="batches per phase (2500; 5000 PixArt)")
    a("--mode-weights", nargs=4, type=numbers, metavar="W999,W749,W499,W249", help="mixtures of the 4 phases")
    a("--loss-weights", nargs=4, type=numbers, metavar="DISTILL,DMD,ADV", help="loss weights of the 4 phases")
    a("--distill-loss", choices=("l2", "l1"), default="l2")
    a("--gan-loss", choices=("lsgan", "hinge", "nonsat"), default="lsgan")
    a("--dmd-tau", type=int, nargs=2, default=(0, 999), metavar=("LOW", "HIGH"), help="DMD re-noising range")
    a("--noise-at-true-tau", action=argparse.BooleanOptionalAction, default=True)
    a("--reference-quirks", action="store_true", help="the reference's re-noising and PixArt features")
    a("--caption-dropout", type=float, default=0.1, help="diffusion objective: P(unconditional)")
    a("--train-text-encoder", action="store_true",
      help="diffusion objective, SD-style pipelines: fine-tune the text encoder too (not kept by --resume)")
    a("--kl-weight", type=float, default=1e-4, help="vae objective: weight of the per-element KL term")
    a("--precision", choices=("auto", "fp32"), default="auto", help="auto: bf16 autocast on GPU")
    a("--gradient-checkpointing", action="store_true")
    a("--checkpoint-every", type=int, default=500)
    a("--sample-every", type=int, default=0, help="sample grid every N steps and at the end (0: never)")
    a("--sample-prompts", nargs="+", help="prompts of the sample grid (default: 4 captions from the data)")
    a("--resume", nargs="?", const="auto", help="continue from OUT/checkpoint-last (or the given checkpoint)")
    a("--max-nonfinite", type=int, default=10, help="stop after this many non-finite steps in a row")
    a("--check-sync", action="store_true", help="log a hash of every rank's weights each step (tests)")
    args = p.parse_args(argv)

    def check(ok, message):
        if not ok:
            p.error(message)
    for k in ("steps", "batch_size", "grad_accum", "checkpoint_every", "max_nonfinite", "lr", "disc_lr",
              "lora_rank", "lora_alpha", "phase_len", "resolution"):
        check(getattr(args, k) is None or getattr(args, k) > 0, f"--{k.replace('_', '-')} must be positive")
    check(args.K is None or args.K >= 4, f"--K must be >= 4 (the mixture has 4 modes), got {args.K}")
    check(not args.guidance or 0 <= args.guidance[0] <= args.guidance[1], "--guidance needs 0 <= MIN <= MAX")
    check(0 <= args.dmd_tau[0] <= args.dmd_tau[1] <= 999, "--dmd-tau needs 0 <= LOW <= HIGH <= 999")
    check(args.data == "digits" or Path(args.data).is_dir(), f"--data {args.data}: no such folder (or use digits)")
    check(args.data != "digits" or DIGITS_FILE.is_file(), f"--data digits: no {DIGITS_FILE}; run flash.data fetch")
    check(0 <= args.caption_dropout <= 1, "--caption-dropout must be in [0, 1]")
    check(not args.train_text_encoder or args.objective == "diffusion", "--train-text-encoder needs --objective diffusion")
    for name, n in (("mode_weights", 4), ("loss_weights", 3)):
        check(all(len(r) == n and min(r) >= 0 < sum(r) for r in getattr(args, name) or []),
              f"--{name.replace('_', '-')}: each phase needs {n} comma-separated numbers >= 0, not all 0")
    if args.reference_quirks:
        args.noise_at_true_tau = False
    return args


def family_key(family):
    return family if family in ("sdxl", "pixart") else "sd15"    # SD2 trains like SD1.5


def resolve_defaults(args, family):
    """Fill every flag left unset with the backbone's default (so the saved config is complete); the phases."""
    key = family_key(family)
    d, (rank, alpha, targets) = DEFAULTS[key], LORA_DEFAULTS[key]
    args.family = family
    args.full_finetune = (args.objective == "diffusion") if args.full_finetune is None else args.full_finetune
    args.lora_rank, args.lora_alpha = args.lora_rank or rank, args.lora_alpha or alpha
    args.lora_targets = list(args.lora_targets or targets)
    args.K, args.phase_len = args.K or d["K"], args.phase_len or d["phase_len"]
    args.guidance = list(args.guidance or d["guidance"])
    args.mode_weights = args.mode_weights or [list(ph.mode_weights) for ph in d["phases"]]
    args.loss_weights = args.loss_weights or [[ph.distill, ph.dmd, ph.adv] for ph in d["phases"]]
    args.lr = args.lr or (1e-5 if args.objective == "flash" else 1e-4)
    args.disc_lr = args.disc_lr or args.lr
    return [Phase(ph.name, tuple(mw), *lw) for ph, mw, lw in zip(d["phases"], args.mode_weights, args.loss_weights)]


# ----------------------------------------------------------------------------------------------------
# 2. Distributed set-up: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / PORT (multi-node too)


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    def mean(self, tensor):
        if self.world > 1:
            tdist.all_reduce(tensor)
            tensor /= self.world
        return tensor


def setup_distributed():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        tdist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, device)


def average_gradients(params, d, bucket=1 << 25):
    """What DDP does, once per optimiser step: .grad = mean over ranks, in flat buckets of up to 32M values
    (so a full fine-tune never concatenates all its gradients at once)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    chunks = []
    for p in params:
        if not chunks or sum(q.numel() for q in chunks[-1]) + p.numel() > bucket:
            chunks.append([])
        chunks[-1].append(p)
    for chunk in chunks if d.world > 1 else []:
        flat = d.mean(torch.cat([p.grad.reshape(-1) for p in chunk]))
        for p, g in zip(chunk, flat.split([p.numel() for p in chunk])):
            p.grad.copy_(g.view_as(p))


# ----------------------------------------------------------------------------------------------------
# 3. Randomness and data

STEP, SAMPLE, EPOCH, ITEM, GRID = range(1, 6)      # stream tags mixed into the seeds


def seed_for(*keys):
    """A 64-bit seed from integer keys; numpy's SeedSequence hashes them, so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def generator(*keys):
    return torch.Generator().manual_seed(seed_for(*keys))


def step_draws(args, step, phase):
    """The draws every rank shares at `step`: grid index i ~ pi_phase, teacher guidance w, DMD guidance w'."""
    g = generator(args.seed, STEP, step)
    i = sample_grid_index(mixture_pmf(args.K, phase.mode_weights), g)
    lo, hi = args.guidance
    w, w_dmd = (lo + (hi - lo) * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
    return i, w, w_dmd


def sample_draws(args, positions, latent_shape, device):
    """Per-sample draws, each sample from its own generator seeded by (seed, position), in a fixed order."""
    gens = [generator(args.seed, SAMPLE, pos) for pos in positions]

    def each(fn):
        return torch.cat([fn(g) for g in gens]).to(device)

    def normal():
        return each(lambda g: torch.randn((1, *latent_shape), generator=g))

    draws = {"vae": normal(), "eps": normal()}
    if args.task == "inpaint":         # drawn after the draws every task has, so those do not move
        draws.update(mask=each(lambda g: random_masks(1, args.resolution, g)), mask_noise=normal())
    elif args.task == "upscale":
        draws["factor"] = each(lambda g: torch.tensor(UPSCALE_FACTORS)[torch.randint(len(UPSCALE_FACTORS), (1,),
                                                                                      generator=g)])
    if args.objective == "flash":
        draws.update(dmd_tau=each(lambda g: dmd_renoise_timesteps(1, g, *args.dmd_tau)), dmd_noise=normal(),
                     gan_tau=each(lambda g: gan_timesteps(1, g)), gan_noise=normal())
    else:
        draws.update(t=each(lambda g: torch.randint(0, 1000, (1,), generator=g)),
                     keep=each(lambda g: torch.rand(1, generator=g)) >= args.caption_dropout)
    return draws


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, EPOCH, epoch))


def load_batch(dataset, seed, positions):
    """The samples at these stream positions: position p is entry p mod N of epoch p // N's permutation, and
    the dataset's own random draws (Digits' captions, from torch's global RNG) are seeded by p as well."""
    images, captions = [], []
    for pos in positions:
        epoch, k = divmod(pos, len(dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(seed, ITEM, pos))
            image, caption = dataset[int(epoch_order(len(dataset), seed, epoch)[k])]
        images.append(image)
        captions.append(caption)
    return torch.stack(images), captions


def build_dataset(args):
    if args.data == "digits":       # its own 10% empty captions off: caption dropout is the trainer's job
        return Digits("train", size=args.resolution, empty_prob=0.0)
    return ImageCaptionFolder(args.data, size=args.resolution)


# ----------------------------------------------------------------------------------------------------
# 4. Models


@dataclass
class Models:
    pipe: object                         # flash.pipeline.Pipeline: VAE, text encoders, tokenizers, denoiser
    denoiser: torch.nn.Module            # the student (with the adapter when LoRA)
    teacher: torch.nn.Module             # the same module (LoRA) or a frozen copy (full fine-tune)
    schedule: NoiseSchedule
    grid: list                           # the teacher's K-step trailing grid
    phases: list
    lora: bool
    latent_shape: tuple
    component: str                       # "unet" or "transformer"
    dit_output_features: bool = False    # --reference-quirks on PixArt
    uncond: dict = None                  # the unconditional conditioning, batch 1
    head: torch.nn.Module = None         # the discriminator head (flash objective)
    text_trainable: bool = False         # --train-text-encoder
    task: str = "text-to-image"          # flash.tasks.TASKS, from the pipeline
    adapter_trainable: bool = False      # diffusion objective on an adapter pipeline: train the adapter only

    def teacher_mode(self):
        return lora_disabled(self.denoiser) if self.lora else nullcontext()

    @property
    def trained(self):
        """The module whose parameters train: the adapter, or the denoiser (its LoRA or every weight)."""
        return self.pipe.adapter if self.adapter_trainable else self.denoiser

    @property
    def trained_component(self):
        """The pipeline folder the trained module is saved as when it is not a LoRA."""
        return "adapter" if self.adapter_trainable else self.component


IMAGE_KEYS = ("concat", "adapter_residuals")      # the image condition inside a conditioning dict


def cond_map(fn, *conds):
    """fn over the matching tensors of conditioning dicts {context, context_mask, added_cond: {...},
    concat, adapter_residuals: [...]}."""
    if isinstance(conds[0], dict):
        return {k: cond_map(fn, *(c[k] for c in conds)) for k in conds[0]}
    if isinstance(conds[0], (list, tuple)):
        return [cond_map(fn, *parts) for parts in zip(*conds)]
    return None if conds[0] is None else fn(*conds)


def with_image_condition(uncond, cond):
    """The unconditional branch: the text of `uncond` (expanded to the batch), the image condition of `cond`
    (method.md, Tasks: the condition is present in both CFG branches)."""
    n = cond["context"].shape[0]
    text = cond_map(lambda u: u.expand(n, *u.shape[1:]), uncond)
    return {**text, **{k: cond[k] for k in IMAGE_KEYS if k in cond}}


def image_condition(m, images, draws):
    """The task's image condition for a batch of training images in [-1, 1] (flash/tasks.py)."""
    if m.task == "inpaint":
        return {"concat": inpaint_condition(m.pipe.vae, images.float(), draws["mask"], draws["mask_noise"])}
    if m.task == "upscale":
        size = images.shape[-1]
        # each image at its own factor, bicubic-upsampled back, then one batched encode
        up = torch.cat([upsample(downsample(img[None].float(), int(f)), size)
                        for img, f in zip(images, draws["factor"])])
        return {"concat": encode(m.pipe.vae, up)}
    if m.task == "adapter":
        with torch.set_grad_enabled(m.adapter_trainable and torch.is_grad_enabled()):
            return {"adapter_residuals": m.pipe.adapter(edge_map(images))}
    return {}


def encode_text(m, prompts, resolution, unconditional=False):
    """Prompts -> the denoiser's keyword arguments, by the family's recipe (flash.pipeline: SD's CLIP states,
    SDXL's two CLIPs + pooled + size ids, PixArt's T5 + mask). Unconditional: the family's own, "" for SD1.5
    and PixArt, zeros for SDXL (method.md, step 1)."""
    if m.text_trainable:        # with grad (encode_prompt runs without); SD's unconditional text is ""
        c = ENCODERS[m.pipe.family](m.pipe, [""] * len(prompts) if unconditional else list(prompts))
    else:
        cond, uncond = encode_prompt(m.pipe, list(prompts), guidance=unconditional)
        c = uncond if unconditional else cond
    return {"context": c.context, **denoiser_kwargs(m.pipe, c, resolution, resolution)}


def predict(model, x, t, cond):
    """Model output at (x, t); PixArt's extra learned-variance channels are dropped."""
    return model(x, t, **cond)[:, :x.shape[1]]


def teacher_pair(m, x, t, cond, uncond):
    """(eps_cond, eps_uncond) of the teacher, both CFG branches in one batched call, without grad."""
    t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
    both = cond_map(lambda c, u: torch.cat([c, u]), cond, uncond)
    with torch.no_grad(), m.teacher_mode():
        return predict(m.teacher, torch.cat([x, x]), t2, both).chunk(2)


def features(m, x, t, cond):
    """Discriminator features: the frozen teacher's mid-block output (method.md, Roles). The generator loss
    backpropagates through this call after `lora_disabled` has exited, so checkpointing is off here: a block
    recomputed in the backward pass would run with the adapter on (torch.utils.checkpoint refuses it)."""
    ckpt, m.teacher.gradient_checkpointing = m.teacher.gradient_checkpointing, False
    try:
        with m.teacher_mode():
            out, mid = m.teacher(x, t, **cond, return_mid=True)
    finally:
        m.teacher.gradient_checkpointing = ckpt
    return out if m.dit_output_features else mid


def build_models(args, device):
    try:
        pipe = load_pipeline(args.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: {e}") from None
    if not pipe.text_encoders or len(pipe.tokenizers) != len(pipe.text_encoders):
        raise ValueError(f"--model {args.model}: the pipeline has no text encoder / tokenizer to encode captions")
    phases = resolve_defaults(args, pipe.family)
    denoiser, vae = pipe.denoiser, pipe.vae
    args.task = pipe.task
    want = vae.config.latent_channels + extra_channels(pipe.task, vae.config.latent_channels)
    if denoiser.config.in_channels != want:
        raise ValueError(f"--model {args.model}: a {pipe.task} pipeline needs a denoiser with {want} input "
                         f"channels, this one has {denoiser.config.in_channels}")
    adapter_trainable = pipe.task == "adapter" and args.objective == "diffusion"
    if adapter_trainable:
        args.full_finetune = False      # the UNet stays frozen: neither LoRA nor full fine-tuning
    for module in [vae, *pipe.text_encoders, denoiser, pipe.adapter]:   # frozen: VAE, text encoders, base weights
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config) if pipe.scheduler_config \
        else SCHEDULES[family_key(pipe.family)]
    f = pipe.vae_scale_factor
    args.resolution = args.resolution or pipe.default_size
    if args.resolution % pipe.size_multiple:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of {pipe.size_multiple} for this model")
    if adapter_trainable:
        teacher = None
        pipe.adapter.requires_grad_(True).train()
    elif args.full_finetune:
        teacher = copy.deepcopy(denoiser) if args.objective == "flash" else None
        denoiser.requires_grad_(True)
    else:
        inject_lora(denoiser, args.lora_rank, args.lora_alpha, args.lora_targets)
        mark_only_lora_trainable(denoiser)
        teacher = denoiser
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    component = "transformer" if pipe.family == "pixart" else "unet"
    m = Models(pipe, denoiser, teacher, schedule, timesteps(schedule, args.K, "trailing"), phases,
               not (args.full_finetune or adapter_trainable),
               (vae.config.latent_channels, args.resolution // f, args.resolution // f),
               component, args.reference_quirks and pipe.family == "pixart", task=pipe.task,
               adapter_trainable=adapter_trainable)
    if args.train_text_encoder:
        if pipe.family not in ("sd15", "sd2"):
            raise ValueError(f"--train-text-encoder: only for SD1.5 / SD2-style pipelines, not {pipe.family}")
        pipe.text_encoders[0].requires_grad_(True)
        m.text_trainable = True
    m.uncond = encode_text(m, [""], args.resolution, unconditional=True)
    if args.objective == "flash":     # one probe of the feature map sizes the head
        blank = torch.zeros(1, 3, args.resolution, args.resolution, device=device)
        probe = {"mask": torch.ones_like(blank[:, :1]), "mask_noise": torch.zeros(1, *m.latent_shape, device=device),
                 "factor": torch.tensor([UPSCALE_FACTORS[0]])}
        with torch.no_grad():
            cond = {**m.uncond, **image_condition(m, blank, probe)}
            feats = features(m, torch.zeros(1, *m.latent_shape, device=device), 999, cond)
        native = {"sd15": (1280, 8, 8), "sdxl": (1280, 32, 32)}.get(pipe.family)
        preset = pipe.family if native == tuple(feats.shape[1:]) else None
        m.head = DiscriminatorHead(feats.shape[1], tuple(feats.shape[2:]), preset=preset).to(device)
    return m


# ----------------------------------------------------------------------------------------------------
# 5. One micro-batch of each objective -> ({term: value}, student loss, discriminator loss or None)


def encode_images(m, images, noise):
    """z = scaling_factor * (mean + std * noise), a VAE posterior sample, in fp32 (SDXL's VAE overflows in 16 bit)."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        post = m.pipe.vae.encode(images.float())
        return m.pipe.vae.scale_latents(post.mean + post.std * noise)


def flash_micro_batch(m, args, images, cond, draws, i, w, w_dmd, phase):
    """method.md, "One training step", steps 1 to 7."""
    uncond = with_image_condition(m.uncond, cond)
    z = encode_images(m, images, draws["vae"])                                   # step 1
    t = int(m.grid[i])
    x_t = noisy_latent(z, draws["eps"], i, m.grid, m.schedule)                    # step 3
    out = student_output(x_t, predict(m.denoiser, x_t, t, cond), t, m.schedule)  # step 4
    target = teacher_target(lambda x, s: teacher_pair(m, x, s, cond, uncond), x_t, i, m.grid, m.schedule, w)
    terms = {"distill": distillation_loss(out, target, args.distill_loss)}      # steps 5, 6
    loss = phase.distill * terms["distill"]
    again = dict(schedule=m.schedule, grid=m.grid, noise_at_true_tau=args.noise_at_true_tau)
    if phase.dmd > 0:          # DMD, the student as fake score (computed only when it counts)
        tau = draws["dmd_tau"]
        x_tau = renoise(out.detach(), draws["dmd_noise"], tau, **again)
        eps_real = cfg(*teacher_pair(m, x_tau, tau, cond, uncond), w_dmd)
        with torch.no_grad():
            eps_fake = predict(m.denoiser, x_tau, tau, cond)
        terms["dmd"] = dmd_loss(out, m.schedule.pred_x0(x_tau, eps_real.float(), tau),
                                m.schedule.pred_x0(x_tau, eps_fake.float(), tau))
        loss = loss + phase.dmd * terms["dmd"]
    # Adversarial: one noise re-noises the student output (fake) and the data latent (real). The fake features
    # are computed once per batch, with grad only when the generator loss counts (not in the warm-up).
    tau, n = draws["gan_tau"], draws["gan_noise"]
    m.head.requires_grad_(False)       # the generator loss trains the student, not the head
    with torch.set_grad_enabled(phase.adv > 0):
        f_fake = features(m, renoise(out, n, tau, **again), tau, cond)
        terms["gen"] = generator_loss(m.head(f_fake), args.gan_loss)
    m.head.requires_grad_(True)
    if phase.adv > 0:
        loss = loss + phase.adv * terms["gen"]
    with torch.no_grad():
        f_real = features(m, renoise(z, n, tau, **again), tau, cond)
    terms["disc"] = discriminator_loss(m.head(f_real), m.head(f_fake.detach()), args.gan_loss)   # step 7
    return terms, loss, terms["disc"]


def diffusion_micro_batch(m, args, images, cond, draws):
    """DDPM's simple loss mse(model(x_t, t, c), eps) (v for v-prediction models), t ~ U{0..999}; captions
    replaced by the unconditional conditioning with probability --caption-dropout, so that CFG works."""
    uncond = encode_text(m, [""], args.resolution, unconditional=True) if m.text_trainable else m.uncond
    uncond = with_image_condition(uncond, cond)
    keep = draws["keep"]
    cond = cond_map(lambda c, u: torch.where(keep.view(-1, *[1] * (c.ndim - 1)), c, u), cond, uncond)
    z = encode_images(m, images, draws["vae"])
    t, eps = draws["t"], draws["eps"]
    x_t = m.schedule.add_noise(z, eps, t)
    target = eps if m.schedule.prediction_type == "epsilon" else m.schedule.velocity(z, eps, t)
    loss = F.mse_loss(predict(m.denoiser, x_t, t, cond).float(), target.float())
    return {"diffusion": loss}, loss, None


# ----------------------------------------------------------------------------------------------------
# 6. Optimisers, checkpoints and resume


def trainable(m):
    return {n: p for n, p in m.trained.named_parameters() if p.requires_grad}


def text_params(m):
    return list(m.pipe.text_encoders[0].parameters()) if m.text_trainable else []


def build_optimizers(args, m):
    """AdamW (betas .9 / .999, weight decay .01) at a constant lr, for the student and, apart, the head."""
    opts = {"student": torch.optim.AdamW([*trainable(m).values(), *text_params(m)], lr=args.lr,
                                         weight_decay=args.weight_decay)}
    if m.head is not None:
        opts["disc"] = torch.optim.AdamW(m.head.parameters(), lr=args.disc_lr, weight_decay=args.weight_decay)
    return opts


def fault(kind, step):
    """Test hook (FLASH_TRAIN_FAULT, see the top of the file): is `kind` armed at `step`?"""
    name, _, steps = os.environ.get("FLASH_TRAIN_FAULT", "").partition(":")
    return name == kind and str(step) in steps.split(",")


def save_snapshot(m, folder):
    """What sample.py and diffusers load: the LoRA (diffusers format; PixArt also PEFT, as released) or the
    fine-tuned denoiser as a component folder (config.json + diffusion_pytorch_model.safetensors)."""
    if m.lora:
        save_lora(m.denoiser, folder / "pytorch_lora_weights.safetensors", "diffusers", prefix=m.component)
        if m.component == "transformer":
            save_lora(m.denoiser, folder, "peft")
        return
    save_component(m.trained, m.trained_component, folder)


def save_checkpoint(args, m, opts, step, streak):
    """OUT/checkpoint-last/: the snapshot plus the resume state (exact trainable tensors, head, optimisers, RNG
    states, step, phase, config). Written into a temporary folder, then published by two renames: a kill at
    any moment leaves the new or the previous checkpoint complete (checkpoint-old between the renames)."""
    out = Path(args.out)
    tmp, last, old = out / ".checkpoint-tmp", out / "checkpoint-last", out / "checkpoint-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_snapshot(m, tmp)
    if m.lora:      # raw adapter tensors: the diffusers file folds alpha / rank into B, not bit-exact
        write_safetensors(trainable(m), tmp / "trainable.safetensors")
    if fault("kill-write", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if m.head is not None:
        write_safetensors(m.head.state_dict(), tmp / "discriminator.safetensors")
    # Nothing in the loop draws from the global generators (see the top); their states are kept anyway.
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizers": {k: o.state_dict() for k, o in opts.items()}, "rng": rng}, tmp / "resume.pt")
    state = {"step": step, "phase": phase_at(step, args.phase_len), "nonfinite_streak": streak, "config": vars(args)}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.rglob("*"):            # on disk before it is published (power loss, not only a kill)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    if fault("kill-swap", step):
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, last)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(args):
    path = Path(args.out) / "checkpoint-last" if args.resume == "auto" else Path(args.resume)
    if args.resume == "auto" and not path.is_dir():
        path = path.parent / "checkpoint-old"       # the run was killed between the two renames of a save
    if not (path / "state.json").is_file():
        where = path if args.resume != "auto" else path.parent / "checkpoint-last"
        raise ValueError(f"--resume: no checkpoint in {where}")
    return path


def load_checkpoint(path, args, m, opts, device):
    """Restore a resume state; returns (next step, non-finite streak)."""
    state = json.loads((path / "state.json").read_text())
    changed = [k for k, v in state["config"].items() if k not in ("steps", "resume", "sample_every",
               "checkpoint_every", "sample_prompts") and json.dumps(v) != json.dumps(getattr(args, k, None))]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"train.py: warning: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    weights_file = f"{m.trained_component}/diffusion_pytorch_model.safetensors"
    source = path / ("trainable.safetensors" if m.lora else weights_file)
    tensors, params = read_safetensors(source), trainable(m)
    if set(tensors) != set(params):
        raise CheckpointError(f"{source}: its tensors are not this model's trainable parameters (other --lora-* ?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    if m.head is not None:
        m.head.load_state_dict(read_safetensors(path / "discriminator.safetensors"))
    resume = torch.load(path / "resume.pt", map_location=device, weights_only=True)
    for k, o in opts.items():
        o.load_state_dict(resume["optimizers"][k])
    torch.set_rng_state(resume["rng"]["torch"].cpu())
    if "cuda" in resume["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(resume["rng"]["cuda"].cpu())
    return state["step"], state["nonfinite_streak"]


def export_final(args, m):
    """OUT/final/: the LoRA, or after a full fine-tune a whole pipeline folder with the new denoiser, usable
    as --model (e.g. as the teacher of a distillation)."""
    final = Path(args.out) / "final"
    if m.lora:
        save_snapshot(m, final)
    else:
        save_pipeline(m.pipe, final)


# ----------------------------------------------------------------------------------------------------
# 7. Sample grid: the student at 1, 2 and 4 steps beside the teacher (flash), or the model with / without CFG


def sample_grid(args, m, batch, step):
    """A row per sample of `batch` (images, captions); columns: [the task's input,] then the student at
    1, 2, 4 steps and the teacher at 25 (flash), or the model with / without CFG (diffusion)."""
    images, prompts = batch
    task_kw, shown = task_inputs(m.task, images.to(m.pipe.device), generator(args.seed, GRID))
    g_mid = sum(args.guidance) / 2
    if args.objective == "flash":      # the student without CFG (method.md, Inference), the teacher with it
        cols = [(False, "flash", s, 0.0) for s in (1, 2, 4)] + [(True, "dpm++2m", 25, g_mid)]
    else:
        cols = [(False, "dpm++2m", 25, g_mid), (False, "dpm++2m", 25, 0.0)]
    columns = [] if shown is None else [shown.cpu()]
    for teacher, sampler, steps, guidance in cols:
        if teacher and not m.lora:
            setattr(m.pipe, m.component, m.teacher)
        try:
            with m.teacher_mode() if teacher else nullcontext():
                columns.append(generate(m.pipe, prompts, steps=steps, sampler=sampler, guidance=guidance,
                                       height=args.resolution, width=args.resolution, progress=False,
                                       generator=generator(args.seed, GRID), **task_kw).cpu())  # same noise
        finally:
            setattr(m.pipe, m.component, m.denoiser)
    grid = torch.cat([torch.cat([col[r] for col in columns], dim=2) for r in range(len(prompts))], dim=1)
    path = Path(args.out) / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------------------------------
# 8. The loop


def setup(args, d):
    """Models, optimisers, resume state and data: where whatever the user can get wrong shows up."""
    torch.manual_seed(args.seed)        # the same adapter / head init on every rank (broadcast anyway below)
    checkpoint = find_checkpoint(args) if args.resume else None
    m = build_models(args, d.device)
    opts = build_optimizers(args, m)
    start, streak = load_checkpoint(checkpoint, args, m, opts, d.device) if checkpoint else (0, 0)
    return m, opts, start, streak, build_dataset(args)


def train(args):
    d = setup_distributed()
    try:
        m, opts, start, streak, dataset = setup(args, d)
    except (ValueError, OSError) as e:       # bad input (CheckpointError is a ValueError): one line, no traceback
        if d.rank == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    student_params = list(trainable(m).values()) + text_params(m)
    head_params = list(m.head.parameters()) if m.head is not None else []
    for p in student_params + head_params if d.world > 1 else []:
        tdist.broadcast(p.data, src=0)
    out, prompts, log = Path(args.out), args.sample_prompts, None
    if d.rank == 0:     # the log of a resumed run continues where its checkpoint stopped
        out.mkdir(parents=True, exist_ok=True)
        old = (out / "log.jsonl").read_text().splitlines() if start and (out / "log.jsonl").is_file() else []
        log = open(out / "log.jsonl", "w")
        log.writelines(line + "\n" for line in old if json.loads(line)["step"] < start)
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    stop = []

    def on_signal(signum, frame):      # finish the step, save, exit; a second signal kills at once
        stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    cuda_bf16 = d.device.type == "cuda" and args.precision == "auto"
    amp = torch.autocast("cuda", torch.bfloat16) if cuda_bf16 else nullcontext()
    bar = tqdm(total=args.steps, initial=start, disable=d.rank != 0, dynamic_ncols=True)

    for step in range(start, args.steps):
        phase = m.phases[phase_at(step, args.phase_len)]
        i, w, w_dmd = step_draws(args, step, phase) if args.objective == "flash" else (None, None, None)
        sums = torch.zeros(len(TERMS) + 2, dtype=torch.float64)     # terms, student loss, stop flag
        # -- student and discriminator gradients, accumulated over the micro-batches
        for micro in range(args.grad_accum):
            first = ((step * d.world + d.rank) * args.grad_accum + micro) * args.batch_size
            positions = range(first, first + args.batch_size)
            images, captions = load_batch(dataset, args.seed, positions)
            images = images.to(d.device)
            draws = sample_draws(args, positions, m.latent_shape, d.device)
            with amp:
                cond = {**encode_text(m, captions, args.resolution), **image_condition(m, images, draws)}
                if args.objective == "flash":
                    terms, loss, disc = flash_micro_batch(m, args, images, cond, draws, i, w, w_dmd, phase)
                else:
                    terms, loss, disc = diffusion_micro_batch(m, args, images, cond, draws)
            if fault("nan", step):
                loss = loss * math.nan
            (loss / args.grad_accum).backward()
            if disc is not None:
                (disc / args.grad_accum).backward()
            for k, v in terms.items():
                sums[TERMS.index(k)] += v.item() / args.grad_accum
            sums[len(TERMS)] += loss.item() / args.grad_accum
        if fault("kill-step", step):
            os.kill(os.getpid(), signal.SIGKILL)
        # -- all-reduce, then the student step and the discriminator step (skipped if anything is not finite)
        average_gradients(student_params, d)
        average_gradients(head_params, d)
        sums[-1] = float(bool(stop))
        stats = d.mean(sums.to(d.device)).cpu()        # losses averaged over ranks; any rank's signal stops all
        finite = bool(stats.isfinite().all()) and all(bool(p.grad.isfinite().all())
                                                      for p in student_params + head_params)
        if finite:
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(student_params, args.clip_grad)
            for o in opts.values():
                o.step()
        streak = 0 if finite else streak + 1
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        # -- log: every loss term, the phase and the draws (non-finite values as null)
        record = {"step": step, "lr": args.lr, "loss": stats[len(TERMS)].item(),
                  **{k: stats[j].item() for j, k in enumerate(TERMS) if k in terms},
                  "images": (step + 1) * args.batch_size * args.grad_accum * d.world}
        if args.objective == "flash":
            record.update(phase=phase_at(step, args.phase_len), phase_name=phase.name, i=i, t=int(m.grid[i]), w=w,
                          w_dmd=w_dmd, loss_weights=[phase.distill, phase.dmd, phase.adv])
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if not finite:
            record["skipped"] = "non-finite loss or gradient"
        if args.check_sync:         # a hash of this rank's trainable weights, gathered from every rank
            h = hashlib.sha256(b"".join(p.detach().cpu().view(torch.uint8).numpy().tobytes()
                                        for p in student_params + head_params))
            mine = torch.tensor([int.from_bytes(h.digest()[:7], "little")], device=d.device)
            hashes = [mine.clone() for _ in range(d.world)]
            if d.world > 1:
                tdist.all_gather(hashes, mine)
            record["rank_hashes"] = [int(h) for h in hashes]
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix({k: f"{record[k]:.4g}" for k in TERMS if record.get(k) is not None}, refresh=False)
            bar.update(1)
        # -- checkpoint, sample grid, stop
        stopping, done = stats[-1].item() > 0, step + 1 == args.steps
        if d.rank == 0 and ((step + 1) % args.checkpoint_every == 0 or stopping or done
                            or streak >= args.max_nonfinite):
            save_checkpoint(args, m, opts, step + 1, streak)
        if streak >= args.max_nonfinite:
            if d.world > 1:
                tdist.barrier()         # leave together, after rank 0 has saved
            raise SystemExit(f"train.py: stopping at step {step}: {streak} steps in a row had a non-finite loss or "
                             f"gradient; the last finite weights are in {out}/checkpoint-last (lower --lr? bad data?)")
        if d.rank == 0 and args.sample_every and ((step + 1) % args.sample_every == 0 or done):
            images, captions = load_batch(dataset, args.seed, range(len(prompts) if prompts else min(4, len(dataset))))
            sample_grid(args, m, (images, prompts or captions), step + 1)
        if stopping:
            if d.rank == 0:
                print(f"\ntrain.py: stop signal: checkpoint saved after step {step + 1} in {out}/checkpoint-last",
                      file=sys.stderr)
            break
    else:
        if d.rank == 0:
            export_final(args, m)
    # -- cleanup
    bar.close()
    if log is not None:
        log.close()
    if d.world > 1:
        tdist.barrier()
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# 9. The autoencoder objective (recipes/digits.sh, stage 1): VAE weights only, then the latent scale


def vae_loss(vae, images, noise, kl_weight):
    """L1 + L2 reconstruction of a posterior sample plus kl_weight * KL(q(z|x) || N(0, I)), all per-element
    means. LDM's VAEs add LPIPS and a patch GAN; on 32x32 digits plain pixel losses give sharp enough
    strokes, and a weak KL keeps the latent smooth without blurring the reconstructions."""
    post = vae.encode(images)
    recon = vae.decode(post.mean + post.std * noise)
    l1, l2 = (recon - images).abs().mean(), F.mse_loss(recon, images)
    kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).mean()
    return {"l1": l1, "l2": l2, "kl": kl}, l1 + l2 + kl_weight * kl, recon


@torch.no_grad()
def latent_scale(vae, dataset, seed, count=2000, batch=250):
    """1 / std of posterior samples of `count` training images: the scaling_factor that gives the diffusion
    model unit-variance latents (how SD's 0.18215 was found)."""
    zs = []
    for first in range(0, min(count, len(dataset)), batch):
        images, _ = load_batch(dataset, seed, range(first, first + batch))
        zs.append(vae.encode(images).sample(generator(seed, GRID, first)))
    return 1.0 / torch.cat(zs).float().std().item()


def train_vae(args):
    """Train the pipeline's AutoencoderKL on the data, then save the pipeline with the new VAE and scale."""
    pipe = load_pipeline(args.model)
    args.resolution, args.lr = args.resolution or pipe.default_size, args.lr or 1e-3
    vae, dataset, out = pipe.vae.float().train().requires_grad_(True), build_dataset(args), Path(args.out)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    with open(out / "log.jsonl", "w") as log:
        for step in tqdm(range(args.steps), dynamic_ncols=True):
            images, _ = load_batch(dataset, args.seed, range(step * args.batch_size, (step + 1) * args.batch_size))
            f = pipe.vae_scale_factor
            noise = torch.randn((len(images), vae.config.latent_channels, args.resolution // f,
                                 args.resolution // f), generator=generator(args.seed, SAMPLE, step))
            terms, loss, recon = vae_loss(vae, images, noise, args.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), args.clip_grad)
            opt.step()
            log.write(json.dumps({"step": step, "lr": args.lr, "loss": loss.item(),
                                  **{k: v.item() for k, v in terms.items()}}) + "\n")
    vae.eval().requires_grad_(False)
    vae.config.scaling_factor = latent_scale(vae, dataset, args.seed)
    print(f"train.py: vae scaling_factor = {vae.config.scaling_factor:.5f}", file=sys.stderr)
    pairs = torch.cat([images[:8], recon[:8].detach().clamp(-1, 1)], dim=2)      # originals over reconstructions
    grid = (torch.cat(list(pairs), dim=2).permute(1, 2, 0).numpy() + 1) * 127.5
    (out / "samples").mkdir(exist_ok=True)
    Image.fromarray(grid.round().astype(np.uint8)).save(out / "samples" / f"step-{args.steps:07d}.png")
    save_pipeline(pipe, out / "final")


# ----------------------------------------------------------------------------------------------------
# 10. Main


def main(argv=None):
    args = parse_args(argv)
    train_vae(args) if args.objective == "vae" else train(args)


if __name__ == "__main__":
    main()
