"""Train a denoiser: Flash Diffusion distillation (`--objective flash`) or plain denoising training and
fine-tuning (`--objective diffusion`, e.g. the digits teacher). One process or `torchrun --nproc_per_node=N`:

    torchrun --nproc_per_node=2 train.py --model PIPELINE --data FOLDER|SHARDS|digits --out runs/x [options]

Paper: Chadebec et al., "Flash Diffusion" (arXiv 2406.02347); docs/method.md has every number and the
algorithm, flash/losses.py the losses as pure functions. This file reads top to bottom: config, data, models,
the Flash step, the loop. Design choices and deviations from the authors' reference code:
- ONE copy of the base weights: the student is the denoiser plus a LoRA adapter, the teacher the same module
  inside `lora_disabled`, the DMD fake score the student itself (no grad, no CFG), the discriminator the
  teacher's mid-block features plus a trainable head. The reference deep-copies the model; here only
  --full-finetune does (the teacher is then a frozen copy).
- No DDP wrapper, an explicit gradient all-reduce instead (flash/distributed.py says why). Every random draw
  is a function of (seed, step) or (seed, sample position) (flash/seeds.py), so N ranks x batch b equals
  one process x batch N*b or accumulation, and --resume (flash/checkpoint.py) continues bit-exactly.
- The phase counter counts batches and is saved (the reference counted forward calls, and forgot it on
  resume). DMD / GAN re-noising uses the true tau; --reference-quirks restores the reference's t=30 noise
  and, for PixArt, its discriminator on the model output instead of the middle block.
- Tasks beyond text-to-image come with the pipeline (flash/tasks.py): the image condition goes to both CFG
  branches of every call, only the text is dropped (flash/conditioning.py). `--objective diffusion` on an
  adapter pipeline trains the adapter alone (as T2I-Adapter is trained); `--objective flash` keeps it frozen.
The pipeline's autoencoder is trained by recipes/train_vae.py.
"""
import argparse
import copy
import functools
import json
import math
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flash.checkpoint import check_out, load_checkpoint, publish_folder, save_checkpoint, start_log
from flash import preview
from flash.cli import Parser
from flash.cpu import train_autocast
from flash.conditioning import cond_map, encode_text, image_condition, with_image_condition
from flash.data import data_arguments, data_check, training_stream
from flash.distributed import average_gradients, barrier, broadcast, cleanup, setup_distributed, stop_signals
from flash.lora import DEFAULT_TARGETS, PIXART_TARGETS, inject_lora, lora_disabled, mark_only_lora_trainable, save_lora
from flash.losses import (DEFAULTS, DiscriminatorHead, Phase, discriminator_loss, distillation_loss, dmd_loss,
                          dmd_renoise_timesteps, gan_timesteps, generator_loss, mixture_pmf, noisy_latent, phase_at,
                          renoise, sample_grid_index, student_output, teacher_target)
from flash.schedule import SCHEDULES, NoiseSchedule, cfg, timesteps
from flash.seeds import SAMPLE, STEP, generator
from flash.tasks import UPSCALE_FACTORS, extra_channels, random_masks
from weights import load_pipeline
from weights.save import save_component, save_pipeline

# ----------------------------------------------------------------------------------------------------
# 1. Config

# LoRA rank, alpha, targets of the released adapters (docs/method.md, "LoRA"); the rest per backbone: losses.DEFAULTS.
LORA_DEFAULTS = {"sd15": (128, 128.0, DEFAULT_TARGETS), "sdxl": (64, 64.0, DEFAULT_TARGETS),
                 "pixart": (64, 8.0, PIXART_TARGETS)}
TERMS = ("distill", "dmd", "gen", "disc", "diffusion")


def numbers(text):
    return [float(v) for v in text.split(",")]


def parse_args(argv=None):
    p = Parser(prefix="train.py: ", description="Flash Diffusion distillation / diffusion training (docs/method.md)")
    a = p.add_argument
    a("--model", required=True, help="pipeline folder (SD1.5, SDXL, PixArt) or single-file checkpoint")
    data_arguments(a)      # --data (a folder, tar shards, 'digits'), --caption-key, --buckets, --workers
    a("--out", default="runs/train", help="log.jsonl, checkpoint-last/, samples/, final/")
    a("--objective", choices=("flash", "diffusion"), default="flash")
    a("--resolution", type=int, help="image side (default: the denoiser's sample_size x VAE factor)")
    a("--steps", type=int, default=10000, help="optimiser steps (batches)")
    a("--batch-size", type=int, default=4, help="per rank and per micro-batch")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--lr", type=float, help="default 1e-5 (flash, docs/method.md) or 1e-4 (diffusion)")
    a("--disc-lr", type=float, help="discriminator head learning rate (default: --lr)")
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=0.0, help="max student gradient norm (0: off, as the reference)")
    a("--seed", type=int, default=0)
    a("--full-finetune", action=argparse.BooleanOptionalAction, default=None,
      help="train every weight (teacher = frozen copy); default: LoRA for flash, full for diffusion")
    a("--lora-rank", type=int), a("--lora-alpha", type=float)
    a("--lora-targets", nargs="+", help="module name suffixes (default per family, docs/method.md)")
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
    a("--precision", choices=("auto", "fp32"), default="auto", help="auto: bf16 autocast on GPU")
    a("--gradient-checkpointing", action="store_true")
    a("--checkpoint-every", type=int, default=500)
    a("--sample-every", type=int, default=0, help="sample grid every N steps and at the end (0: never)")
    a("--sample-prompts", nargs="+", help="prompts of the sample grid (default: 4 captions from the data)")
    a("--resume", nargs="?", const="auto", help="continue from OUT/checkpoint-last (or the given checkpoint)")
    a("--max-nonfinite", type=int, default=10, help="stop after this many non-finite steps in a row")
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
    check(*data_check(args))
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
# 2. Data: the random draws of a step and of each sample (the sample stream: flash/data.py)


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


# ----------------------------------------------------------------------------------------------------
# 3. Models


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
    adapter_trainable: bool = False      # diffusion objective on an adapter pipeline: train the adapter only

    def teacher_mode(self):
        return lora_disabled(self.denoiser) if self.lora else nullcontext()

    @contextmanager
    def teacher_in_pipeline(self):
        """The teacher as the pipeline's denoiser (to sample from it): the adapter off, or the frozen copy."""
        setattr(self.pipe, self.component, self.teacher)
        try:
            with self.teacher_mode():
                yield
        finally:
            setattr(self.pipe, self.component, self.denoiser)

    @property
    def trained(self):
        """The module whose parameters train: the adapter, or the denoiser (its LoRA or every weight)."""
        return self.pipe.adapter if self.adapter_trainable else self.denoiser

    @property
    def trained_component(self):
        """The pipeline folder the trained module is saved as when it is not a LoRA."""
        return "adapter" if self.adapter_trainable else self.component


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
    """Discriminator features: the frozen teacher's mid-block output (docs/method.md, "Roles"). The generator loss
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
    m = Models(pipe=pipe, denoiser=denoiser, teacher=teacher, schedule=schedule, phases=phases,
               grid=timesteps(schedule, args.K, "trailing"), lora=not (args.full_finetune or adapter_trainable),
               latent_shape=(vae.config.latent_channels, args.resolution // f, args.resolution // f),
               component="transformer" if pipe.family == "pixart" else "unet",
               dit_output_features=args.reference_quirks and pipe.family == "pixart",
               adapter_trainable=adapter_trainable, text_trainable=args.train_text_encoder)
    if args.train_text_encoder:
        if pipe.family not in ("sd15", "sd2"):
            raise ValueError(f"--train-text-encoder: only for SD1.5 / SD2-style pipelines, not {pipe.family}")
        pipe.text_encoders[0].requires_grad_(True)
    m.uncond = encode_text(m.pipe, [""], args.resolution, unconditional=True, trainable=m.text_trainable)
    if args.objective == "flash":     # one probe of the feature map sizes the head
        blank = torch.zeros(1, 3, args.resolution, args.resolution, device=device)
        probe = {"mask": torch.ones_like(blank[:, :1]), "mask_noise": torch.zeros(1, *m.latent_shape, device=device),
                 "factor": torch.tensor([UPSCALE_FACTORS[0]])}
        with torch.no_grad():
            cond = {**m.uncond, **image_condition(m.pipe, blank, probe)}
            feats = features(m, torch.zeros(1, *m.latent_shape, device=device), 999, cond)
        m.head = DiscriminatorHead.for_features(pipe.family, feats.shape[1:]).to(device)
    return m


# ----------------------------------------------------------------------------------------------------
# 4. The Flash step: docs/method.md, "One training step", on one micro-batch
#    -> ({term: value}, student loss, discriminator loss or None); the diffusion objective beside it


def encode_images(m, images, noise):
    """z = scaling_factor * (mean + std * noise), a VAE posterior sample, in fp32 (SDXL's VAE overflows in 16 bit)."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        post = m.pipe.vae.encode(images.float())
        return m.pipe.vae.scale_latents(post.mean + post.std * noise)


def flash_micro_batch(m, args, images, cond, draws, i, w, w_dmd, phase):
    """Steps 1 and 3 to 7 (step 2, the phase and the grid index i shared by the batch, is the loop's)."""
    # 1. The latent z (the text and image conditioning `cond` are the caller's); the unconditional branch.
    uncond = with_image_condition(m.uncond, cond)
    z = encode_images(m, images, draws["vae"])
    # 3. x_t at t = grid[i]: pure noise at t = 999, else the forward process.
    t = int(m.grid[i])
    x_t = noisy_latent(z, draws["eps"], i, m.grid, m.schedule)
    # 4. The student's one-step prediction in the LCM boundary form.
    out = student_output(x_t, predict(m.denoiser, x_t, t, cond), t, m.schedule)
    # 5. The teacher target: DPM-Solver++ with CFG w over the rest of the grid, without grad.
    target = teacher_target(lambda x, s: teacher_pair(m, x, s, cond, uncond), x_t, i, m.grid, m.schedule, w)
    # 6. The losses, weighted by the phase, summed into the student loss (7): distillation, ...
    terms = {"distill": distillation_loss(out, target, args.distill_loss)}
    loss = phase.distill * terms["distill"]
    again = dict(schedule=m.schedule, grid=m.grid, noise_at_true_tau=args.noise_at_true_tau)
    if phase.dmd > 0:          # ... DMD, the student as fake score (computed only when it counts), ...
        tau = draws["dmd_tau"]
        x_tau = renoise(out.detach(), draws["dmd_noise"], tau, **again)
        eps_real = cfg(*teacher_pair(m, x_tau, tau, cond, uncond), w_dmd)
        with torch.no_grad():
            eps_fake = predict(m.denoiser, x_tau, tau, cond)
        terms["dmd"] = dmd_loss(out, m.schedule.pred_x0(x_tau, eps_real.float(), tau),
                                m.schedule.pred_x0(x_tau, eps_fake.float(), tau))
        loss = loss + phase.dmd * terms["dmd"]
    # ... adversarial: one noise re-noises the student output (fake) and the data latent (real). The fake
    # features are computed once per batch, with grad only when the generator loss counts (not in the warm-up).
    tau, n = draws["gan_tau"], draws["gan_noise"]
    m.head.requires_grad_(False)       # the generator loss trains the student, not the head
    with torch.set_grad_enabled(phase.adv > 0):
        f_fake = features(m, renoise(out, n, tau, **again), tau, cond)
        terms["gen"] = generator_loss(m.head(f_fake), args.gan_loss)
    m.head.requires_grad_(True)
    if phase.adv > 0:
        loss = loss + phase.adv * terms["gen"]
    # 7. The discriminator loss, stepped by its own optimiser.
    with torch.no_grad():
        f_real = features(m, renoise(z, n, tau, **again), tau, cond)
    terms["disc"] = discriminator_loss(m.head(f_real), m.head(f_fake.detach()), args.gan_loss)
    return terms, loss, terms["disc"]


def diffusion_micro_batch(m, args, images, cond, draws):
    """DDPM's simple loss mse(model(x_t, t, c), eps) (v for v-prediction models), t ~ U{0..999}; captions
    replaced by the unconditional conditioning with probability --caption-dropout, so that CFG works."""
    uncond = encode_text(m.pipe, [""], args.resolution, unconditional=True, trainable=True) if m.text_trainable \
        else m.uncond
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
# 5. Optimisers, checkpoints (flash/checkpoint.py) and resume


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


def save_snapshot(m, folder):
    """What sample.py and diffusers load: the LoRA (diffusers format; PixArt also PEFT, as released) or the
    fine-tuned denoiser as a component folder (config.json + diffusion_pytorch_model.safetensors)."""
    if m.lora:
        save_lora(m.denoiser, folder / "pytorch_lora_weights.safetensors", "diffusers", prefix=m.component)
        if m.component == "transformer":
            save_lora(m.denoiser, folder, "peft")
        return
    save_component(m.trained, m.trained_component, folder)


def save(args, m, opts, step, streak):
    """OUT/checkpoint-last/: the snapshot, the exact tensors, optimisers and RNG states, step, phase, config."""
    tensors = {"trainable.safetensors": trainable(m)} if m.lora else {}   # exact (the LoRA file folds alpha/rank)
    if m.head is not None:
        tensors["discriminator.safetensors"] = m.head.state_dict()
    state = {"step": step, "phase": phase_at(step, args.phase_len), "nonfinite_streak": streak, "config": vars(args)}
    save_checkpoint(args.out, functools.partial(save_snapshot, m), tensors, opts, state)


def resume(path, args, m, opts, d):
    """Restore a checkpoint in place; returns (next step, non-finite streak)."""
    weights = "trainable.safetensors" if m.lora else f"{m.trained_component}/diffusion_pytorch_model.safetensors"
    tensors = {weights: trainable(m)}       # a full fine-tune's snapshot is its exact fp32 weights
    if m.head is not None:
        tensors["discriminator.safetensors"] = m.head.state_dict()
    state, changed = load_checkpoint(path, tensors, opts, d.device, vars(args))   # refuses another model's run
    if changed and d.rank == 0:
        print(f"train.py: warning: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    return state["step"], state["nonfinite_streak"]


# ----------------------------------------------------------------------------------------------------
# 6. Sample grid: the student at 1, 2 and 4 steps beside the teacher (flash), or the model with / without CFG


def sample_grid(args, m, images, prompts, step):
    """OUT/samples/step-N.png, a row per prompt; the student without CFG (docs/method.md, "Inference")."""
    g_mid, student = sum(args.guidance) / 2, nullcontext
    if args.objective == "flash":
        cols = [(student, "flash", s, 0.0) for s in (1, 2, 4)] + [(m.teacher_in_pipeline, "dpm++2m", 25, g_mid)]
    else:
        cols = [(student, "dpm++2m", 25, g_mid), (student, "dpm++2m", 25, 0.0)]
    path = Path(args.out) / "samples" / f"step-{step:07d}.png"
    preview.sample_grid(m.pipe, images, prompts, cols, args.resolution, args.seed, path)


# ----------------------------------------------------------------------------------------------------
# 7. The loop


def accumulate(args, m, d, data, step, phase, i, w, w_dmd):
    """This rank's micro-batches of `step` (the sample stream, flash/data.py): gradients accumulated in .grad,
    the loss terms averaged into a vector (TERMS, student loss, a slot for the stop flag); and the terms."""
    amp = train_autocast(d.device, args.precision)      # flash/cpu.py: bf16 on GPU; why not on CPUs
    sums = torch.zeros(len(TERMS) + 2, dtype=torch.float64)
    for micro in range(args.grad_accum):
        first = ((step * d.world + d.rank) * args.grad_accum + micro) * args.batch_size
        positions = range(first, first + args.batch_size)
        images, captions, sizes = data.batch(positions)     # sizes: each sample's SizeInfo (flash/buckets.py)
        images = images.to(d.device)
        latent_shape = (m.latent_shape[0], *[s // m.pipe.vae_scale_factor for s in images.shape[2:]])   # its bucket's
        draws = sample_draws(args, positions, latent_shape, d.device)
        with amp:
            cond = {**encode_text(m.pipe, captions, sizes, trainable=m.text_trainable),
                    **image_condition(m.pipe, images, draws, m.adapter_trainable)}
            if args.objective == "flash":
                terms, loss, disc = flash_micro_batch(m, args, images, cond, draws, i, w, w_dmd, phase)
            else:
                terms, loss, disc = diffusion_micro_batch(m, args, images, cond, draws)
        (loss / args.grad_accum).backward()
        if disc is not None:
            (disc / args.grad_accum).backward()
        for k, v in terms.items():
            sums[TERMS.index(k)] += v.item() / args.grad_accum
        sums[len(TERMS)] += loss.item() / args.grad_accum
    return sums, terms


def optimizer_step(args, d, opts, student_params, head_params, sums):
    """All-reduce the gradients and the loss sums, then the student and discriminator steps, both skipped if
    any loss or gradient is not finite. Returns (the sums averaged over ranks, finite)."""
    average_gradients(student_params, d)
    average_gradients(head_params, d)
    stats = d.mean(sums.to(d.device)).cpu()
    finite = bool(stats.isfinite().all()) and all(bool(p.grad.isfinite().all()) for p in student_params + head_params)
    if finite:
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(student_params, args.clip_grad)
        for o in opts.values():
            o.step()
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    return stats, finite


def log_record(args, m, d, step, phase, i, w, w_dmd, stats, terms, finite):
    """One log.jsonl line: every loss term, the phase and the draws (non-finite values as null)."""
    record = {"step": step, "lr": args.lr, "loss": stats[len(TERMS)].item(),
              **{k: stats[j].item() for j, k in enumerate(TERMS) if k in terms},
              "images": (step + 1) * args.batch_size * args.grad_accum * d.world}
    if args.objective == "flash":
        record.update(phase=phase_at(step, args.phase_len), phase_name=phase.name, i=i, t=int(m.grid[i]), w=w,
                      w_dmd=w_dmd, loss_weights=[phase.distill, phase.dmd, phase.adv])
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    if not finite:
        record["skipped"] = "non-finite loss or gradient"
    return record


def train(args):
    d = setup_distributed()
    try:        # models, optimisers, resume state and data: where whatever the user can get wrong shows up
        torch.manual_seed(args.seed)        # the same adapter / head init on every rank (broadcast anyway below)
        checkpoint = check_out(args.out, args.resume)       # first: refuses an --out it would write over
        m = build_models(args, d.device)
        opts = build_optimizers(args, m)
        start, streak = resume(checkpoint, args, m, opts, d) if checkpoint else (0, 0)
        data = training_stream(args, m.pipe, d.rank, d.world, start)
    except (ValueError, OSError) as e:       # bad input (CheckpointError is a ValueError): one line, no traceback
        if d.rank == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    student_params = list(trainable(m).values()) + text_params(m)
    head_params = list(m.head.parameters()) if m.head is not None else []
    broadcast(student_params + head_params, d)
    out, prompts, log = Path(args.out), args.sample_prompts, None
    if d.rank == 0:     # config.json, the data scan's warnings; the log of a resumed run continues where it stopped
        log = start_log(out, start, vars(args), data.dataset)
    stop = stop_signals()       # SIGTERM / SIGINT: finish the step, save, exit
    bar = tqdm(total=args.steps, initial=start, disable=d.rank != 0, dynamic_ncols=True)

    for step in range(start, args.steps):
        # 2. The phase, and the draws every rank shares: grid index i, guidance scales (docs/method.md).
        phase = m.phases[phase_at(step, args.phase_len)]
        i, w, w_dmd = step_draws(args, step, phase) if args.objective == "flash" else (None, None, None)
        # 1, 3-7 on every micro-batch, then the optimiser steps (skipped if anything is not finite).
        sums, terms = accumulate(args, m, d, data, step, phase, i, w, w_dmd)
        sums[-1] = float(bool(stop))            # any rank's signal stops all
        stats, finite = optimizer_step(args, d, opts, student_params, head_params, sums)
        streak = 0 if finite else streak + 1
        record = log_record(args, m, d, step, phase, i, w, w_dmd, stats, terms, finite)
        if log is not None:
            log.write(json.dumps({**record, **data.counts}) + "\n")
            log.flush()
            bar.set_postfix({k: f"{record[k]:.4g}" for k in TERMS if record.get(k) is not None}, refresh=False)
            bar.update(1)
        # Checkpoint, sample grid, stop.
        stopping, done = stats[-1].item() > 0, step + 1 == args.steps
        if d.rank == 0 and ((step + 1) % args.checkpoint_every == 0 or stopping or done
                            or streak >= args.max_nonfinite):
            save(args, m, opts, step + 1, streak)
        if streak >= args.max_nonfinite:
            barrier(d)          # leave together, after rank 0 has saved
            raise SystemExit(f"train.py: stopping at step {step}: {streak} steps in a row had a non-finite loss or "
                             f"gradient; the last finite weights are in {out}/checkpoint-last (lower --lr? bad data?)")
        if d.rank == 0 and args.sample_every and ((step + 1) % args.sample_every == 0 or done):
            images, captions = data.preview(len(prompts) if prompts else 4)
            sample_grid(args, m, images, prompts or captions, step + 1)
        if stopping:
            if d.rank == 0:
                print(f"\ntrain.py: stop signal: checkpoint saved after step {step + 1} in {out}/checkpoint-last",
                      file=sys.stderr)
            break
    else:       # OUT/final/, swapped in whole: the LoRA, or after a full fine-tune a pipeline folder usable as --model
        if d.rank == 0:
            publish_folder(out / "final", lambda f: save_snapshot(m, f) if m.lora else save_pipeline(m.pipe, f))
    # Cleanup.
    bar.close()
    if log is not None:
        log.close()
    cleanup(d)


def main(argv=None):
    try:
        train(parse_args(argv))
    except OSError as e:    # mid-run, e.g. a full disk: one line; the last checkpoint is intact (atomic writes)
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    main()
