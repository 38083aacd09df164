"""Text -> conditioning -> sampler -> VAE decode -> images, for each family (SD1.5/SD2, SDXL, PixArt).

`Pipeline` holds the loaded components; `weights.load_pipeline(path)` builds one from a diffusers pipeline
folder or a single-file checkpoint. `generate` is one loop for every family and sampler:

    prompts -> encode_prompt (per family)          -> cond, uncond   (Conditioning: context, mask, pooled)
    seed    -> randn (B, 4, H/f, W/f), drawn as diffusers draws it
    sample_<sampler>(model_fn, noise, ...)          model_fn = one batched [uncond, cond] denoiser call + CFG
    latents / scaling_factor -> VAE decode -> (x + 1) / 2 clamped to [0, 1]

The family differences are kept in two places: `encode_prompt` (which text states, pooled vector, padding
mask) and `denoiser_kwargs` (SDXL's size/crop ids, PixArt's resolution/aspect-ratio conditions and mask).

Tasks beyond text-to-image (`pipe.task`, flash/tasks.py; UNet families only) add an image condition that
enters BOTH CFG branches (only the text is dropped for the unconditional one), built once per call by
`task_condition` from images in [0, 1]:
- "inpaint" (diffusers' StableDiffusionInpaintPipeline at strength 1): `image` + `mask` (1 = repaint,
  binarized at 0.5) at the output size -> concat [mask, latent SAMPLE of the masked image]. The generator
  draws the initial noise FIRST, then the masked-image posterior sample, then the sampler's own draws.
- "upscale" (flash's FlashUpscalePipeline): `image` = the low-res image, output = its size x `upscale`
  -> concat [posterior mean of the bicubic-upsampled image].
- "adapter" (diffusers' StableDiffusionAdapterPipeline): `adapter_image` at the output size -> T2I-Adapter
  features x `adapter_scale`, added to the UNet's down path.
Condition images are (1 or one per prompt, c, H, W) and follow the prompts' repeat_interleave order for
`batch`. (diffusers tiles one-per-prompt images with `repeat` for num_images_per_prompt > 1, pairing them
with the wrong prompts; flash keeps image i with prompt i.)

Parity with diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline and PixArtAlphaPipeline is the
contract (tests/test_pipeline.py), and with StableDiffusionInpaintPipeline / StableDiffusionAdapterPipeline
(tests/test_task_pipelines.py): same seed -> same initial latents -> same images. Reproduced on purpose:
- CFG runs when guidance > 1 (`do_classifier_free_guidance`), with the unconditional half FIRST in the batch;
  the LCM / Flash samplers default to guidance 0 (no CFG, one model call per step).
- SDXL zeroes the unconditional text states and pooled vector when no negative prompt is given and the
  pipeline config says `force_zeros_for_empty_prompt` (diffusers' default, True, also for single files).
- PixArt lower-cases and strips prompts, pads T5 to 120 tokens and passes the padding mask; its
  unconditional branch encodes "" (or the negative prompt) the same way. (diffusers' default
  `clean_caption=True` also runs an HTML/URL clean-up when bs4 and ftfy are installed, and falls back to
  exactly this without them.)
- A scheduler config that lacks `timestep_spacing` or `clip_sample` gets the default of the diffusers class
  that would run the sampler (CLASS_DEFAULTS), as `XScheduler.from_config(pipe.scheduler.config)` does.
Deviations: PixArt's resolution binning (diffusers renders at the nearest trained aspect ratio and resizes
back) is not done: the image is rendered at the asked size, as `use_resolution_binning=False`. CFG is
combined in fp32 (diffusers: in the model dtype). Prompts longer than the tokenizer's length are truncated
silently. Condition images are not resized (their size must be the output's), inpainting runs at strength
1 only and has no legacy 4-channel (latent blending) mode. No prompt weighting, clip skip, guidance rescale
or IP-adapters.
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm import tqdm

from flash.budget import MAX_SIDE_FACTOR, check_memory, decode_chunk, denoise_chunk, max_side
from flash.cpu import channels_last
from flash.flow import FlowSchedule, is_flow_config, sample_flow
from flash.graphs import graphed
from flash.schedule import SAMPLERS, NoiseSchedule, cfg, max_steps, randn, sample
from flash.sd3 import encode_sd3
from flash.tasks import each_tensor, extra_channels, task_condition, task_size

PIXART_MAX_LENGTH = 120     # PixArt-alpha trained with 120 T5 tokens (its paper, Sec. 3.1)
SD3_MAX_LENGTH = 256        # StableDiffusion3Pipeline's default max_sequence_length for T5


@dataclass
class Pipeline:
    family: str                      # "sd15" | "sd2" | "sdxl" | "pixart" (sd-inpaint variants keep their base family)
    vae: nn.Module
    text_encoders: list              # [clip] for SD1.x/2.x, [clip-L, bigG-with-projection] for SDXL, [t5] for PixArt
    tokenizers: list                 # same order as text_encoders
    scheduler_config: dict = field(default_factory=dict)  # diffusers scheduler_config.json contents
    unet: nn.Module = None           # SD families
    transformer: nn.Module = None    # PixArt
    config: dict = field(default_factory=dict)  # model_index.json contents (force_zeros_for_empty_prompt, ...)
    task: str = "text-to-image"      # flash.tasks.TASKS: "text-to-image" | "inpaint" | "upscale" | "adapter"
    adapter: nn.Module = None        # flash.adapter.T2IAdapter (task "adapter")

    @property
    def inpainting(self):
        """A 9-channel-style UNet: noisy latent + mask + masked-image latent."""
        return self.task == "inpaint"

    @property
    def denoiser(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def vae_scale_factor(self):
        """Pixels per latent: 2 ** (number of VAE levels - 1), 8 for every released VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self):
        """Image sides must be multiples of this: 8 (diffusers' check) and VAE factor x DiT patch size."""
        patch = getattr(self.denoiser.config, "patch_size", None) or 1
        return math.lcm(8, self.vae_scale_factor * patch)

    @property
    def default_size(self):
        """The side the denoiser was trained at, in pixels (diffusers' default height and width)."""
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self):
        return next(self.denoiser.parameters()).dtype

    def use_tiny_vae(self, vae):
        """Decode with `vae` (flash.taesd.AutoencoderTiny) from now on. Text-to-image only: the tasks encode
        images with the full VAE, whose posterior a tiny encoder does not give."""
        if self.task != "text-to-image":
            raise ValueError(f"a tiny VAE decodes text-to-image pipelines only; this one is for {self.task}")
        want, got = self.vae.config.latent_channels, vae.config.latent_channels
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if (got, f) != (want, self.vae_scale_factor):
            raise ValueError(f"the tiny VAE takes {got}-channel latents at 1/{f} scale; this {self.family} "
                             f"pipeline makes {want}-channel ones at 1/{self.vae_scale_factor}")
        self.vae = vae
        return self

    def to(self, device=None, dtype=None):
        """Move every model; the VAE keeps fp32 if its config says force_upcast (it overflows in fp16)."""
        for m in (self.unet, self.transformer, self.adapter, *self.text_encoders):
            if m is not None:
                m.to(device=device, dtype=dtype)
        keep = dtype in (torch.float16, torch.bfloat16) and getattr(self.vae.config, "force_upcast", False)
        self.vae.to(device=device, dtype=None if keep else dtype)
        return self


class Conditioning(NamedTuple):
    """What the denoiser is conditioned on, for a batch of prompts."""
    context: torch.Tensor              # (B, L, C) text states the denoiser cross-attends to
    mask: torch.Tensor = None          # (B, L) 1 = real token: PixArt's T5 padding mask
    pooled: torch.Tensor = None        # (B, P) SDXL: the projected pooled embedding of the bigG encoder

    def repeat(self, n):
        """Each prompt n times in a row (p0, p0, p1, p1, ...), the order of diffusers' num_images_per_prompt."""
        return Conditioning(*(None if v is None else v.repeat_interleave(n, dim=0) for v in self))


def cat(a, b):
    """[a; b] along the batch, field by field (None stays None)."""
    return Conditioning(*(None if x is None else torch.cat([x, y]) for x, y in zip(a, b)))


# -- text -> conditioning -----------------------------------------------------------------------------

def _ids(tokenizer, texts, device, max_length=None):
    ids, mask = tokenizer(texts, max_length=max_length)
    return ids.to(device), mask.to(device)


def _encode_sd(pipe, texts):
    """SD1.x / SD2.x: the single CLIP encoder's last hidden state (after the final LayerNorm), 77 tokens,
    no attention mask (CLIP was trained without one, so pads are attended)."""
    enc, tok = pipe.text_encoders[0], pipe.tokenizers[0]
    ids, _ = _ids(tok, texts, next(enc.parameters()).device)
    return Conditioning(enc(ids).last_hidden_state)


def _encode_sdxl(pipe, texts):
    """SDXL: each CLIP's PENULTIMATE layer (hidden_states[-2], no final LayerNorm), concatenated along
    channels (768 + 1280 = 2048); pooled = the first encoder with a projection, i.e. bigG's projected EOS."""
    states, pooled = [], None
    for enc, tok in zip(pipe.text_encoders, pipe.tokenizers):
        ids, _ = _ids(tok, texts, next(enc.parameters()).device)
        out = enc(ids)
        states.append(out.penultimate_hidden_state)
        if pooled is None and enc.text_projection is not None:
            pooled = out.pooled
    if pooled is None:
        raise ValueError("SDXL pipeline: no text encoder with a projection (CLIPTextModelWithProjection) "
                         "to give the pooled text embedding")
    return Conditioning(torch.cat(states, dim=-1), pooled=pooled)


def _encode_pixart(pipe, texts):
    """PixArt: T5 last hidden state at 120 tokens with its padding mask; prompts lower-cased and stripped."""
    enc, tok = pipe.text_encoders[0], pipe.tokenizers[0]
    texts = [t.lower().strip() for t in texts]
    ids, mask = _ids(tok, texts, next(enc.parameters()).device, PIXART_MAX_LENGTH)
    return Conditioning(enc(ids, attention_mask=mask), mask=mask)


def _encode_sd3(pipe, texts):
    """SD3 / SD3.5: CLIP-L ++ bigG penultimate states and T5's along the tokens, pooled = both CLIP
    projections (flash/sd3.py, StableDiffusion3Pipeline.encode_prompt)."""
    width = pipe.transformer.config.joint_attention_dim
    context, pooled = encode_sd3(pipe.text_encoders, pipe.tokenizers, texts, width, SD3_MAX_LENGTH)
    return Conditioning(context, pooled=pooled)


ENCODERS = {"sd15": _encode_sd, "sd2": _encode_sd, "sdxl": _encode_sdxl, "pixart": _encode_pixart, "sd3": _encode_sd3}


@torch.no_grad()
def encode_prompt(pipe, prompts, negative=None, guidance=True):
    """prompts (str or list) -> (cond, uncond): Conditioning for the prompts and, when `guidance`, for the
    unconditional branch (else None). `negative`: None, one str for all prompts, or one per prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if pipe.family not in ENCODERS:
        raise ValueError(f"pipeline family {pipe.family!r} is not one of {', '.join(ENCODERS)}")
    if not pipe.text_encoders or len(pipe.tokenizers) != len(pipe.text_encoders):
        raise ValueError(f"this {pipe.family} pipeline has {len(pipe.text_encoders)} text encoder(s) and "
                         f"{len(pipe.tokenizers)} tokenizer(s): prompts cannot be encoded (pass prompt_embeds)")
    encode = ENCODERS[pipe.family]
    cond = encode(pipe, prompts)
    if not guidance:
        return cond, None
    if negative is None and pipe.family == "sdxl" and pipe.config.get("force_zeros_for_empty_prompt", True):
        return cond, Conditioning(*(None if v is None else torch.zeros_like(v) for v in cond))
    negative = negative or ""
    negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negative) != len(prompts):
        raise ValueError(f"negative prompts: {len(negative)} given for {len(prompts)} prompts")
    return cond, encode(pipe, negative)


# -- the denoiser call ---------------------------------------------------------------------------------

def denoiser_kwargs(pipe, c, height, width):
    """Family-specific keyword arguments of the denoiser call for conditioning c at image size (h, w)."""
    n, dtype = c.context.shape[0], c.context.dtype
    if pipe.family == "pixart":
        kw = {"context_mask": c.mask}
        if pipe.transformer.config.use_additional_conditions:   # the 1024-MS model: size and aspect ratio
            kw["added_cond"] = {"resolution": torch.tensor([[height, width]], dtype=dtype).repeat(n, 1),
                                "aspect_ratio": torch.tensor([[height / width]], dtype=dtype).repeat(n, 1)}
            kw["added_cond"] = {k: v.to(c.context.device) for k, v in kw["added_cond"].items()}
        return kw
    if pipe.family == "sdxl":
        # SDXL micro-conditioning (Podell et al. 2023, Sec. 2.2): original size, crop top-left, target size.
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=c.context.device)
        return {"added_cond": {"text_embeds": c.pooled, "time_ids": ids.repeat(n, 1)}}
    if pipe.family == "sd3":
        return {"pooled": c.pooled}
    return {}


def make_model_fn(pipe, cond, uncond, guidance, height, width, image_cond=None):
    """model_fn(x, t) -> eps / v for the samplers: one denoiser call on [uncond; cond] when guiding
    (diffusers' order), combined by CFG; PixArt's learned-variance channels are dropped. image_cond: the
    task's denoiser kwargs for the cond rows (`task_condition`), given to the unconditional rows too."""
    model, dtype = pipe.denoiser, pipe.dtype
    c = cond if uncond is None else cat(uncond, cond)
    image_cond = image_cond or {}
    if uncond is not None:
        image_cond = {k: each_tensor(v, lambda x: torch.cat([x, x])) for k, v in image_cond.items()}
    kw = {**denoiser_kwargs(pipe, c, height, width), **image_cond}
    channels = pipe.vae.config.latent_channels
    denoise = graphed(lambda xin, t: model(xin, t, c.context, **kw), pipe.device)   # flash/graphs.py: CUDA only

    def model_fn(x, t):
        xin = x.to(dtype) if uncond is None else torch.cat([x, x]).to(dtype)
        out = denoise(xin, t)[:, :channels].float()
        if uncond is None:
            return out
        out_uncond, out_cond = out.chunk(2)
        return cfg(out_cond, out_uncond, guidance)
    return model_fn


# -- latents -> images ----------------------------------------------------------------------------------

@torch.no_grad()
def decode(pipe, latents):
    """Latents (B, 4, h, w) in the denoiser's scale -> float images (B, 3, H, W) in [0, 1], decoded
    budget.decode_chunk images at a time (the decoder's full-resolution activations are the peak)."""
    vae = channels_last(pipe.vae)      # a no-op but on the 16-bit CPU path, where it halves the decode time
    step = decode_chunk(*(s * pipe.vae_scale_factor for s in latents.shape[-2:]))
    out = []
    for z in latents.split(step):
        z = vae.unscale_latents(z.float()).to(next(vae.parameters()).dtype)
        out.append((vae.decode(z).float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def check_size(pipe, height, width, what=None):
    """Sides a positive multiple of pipe.size_multiple, at most budget.max_side; `what` names where the
    size came from when the caller did not ask for it (a task's condition image)."""
    m, top = pipe.size_multiple, max_side(pipe)
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % m or v > top:
            if what:
                raise ValueError(f"{what} gives a {width}x{height} image; this model draws sides that are "
                                 f"multiples of {m}, at most {top}")
            raise ValueError(f"{name} must be a positive multiple of {m}, at most {top} for this model "
                             f"({MAX_SIDE_FACTOR} x its {pipe.default_size}), got {v!r}")


# Keys a scheduler config may lack whose default differs between the diffusers classes that run the samplers
# (`XScheduler.from_config(pipe.scheduler.config)` fills them from X): a pipeline's PNDM or DPM-Solver config
# run with DDIM clips x0 and spaces "leading"; run with Euler or DPM-Solver it spaces "linspace".
CLASS_DEFAULTS = {"ddim": {"timestep_spacing": "leading", "clip_sample": True},
                  "euler": {"timestep_spacing": "linspace"},
                  "dpm++2m": {"timestep_spacing": "linspace"}}


def schedule_for(sampler, scheduler_config):
    """The NoiseSchedule diffusers' scheduler for `sampler` would build from the pipeline's config (a
    FlowSchedule for a rectified-flow config: SD3 / SD3.5, flash/flow.py)."""
    if is_flow_config(scheduler_config):
        return FlowSchedule.from_config(scheduler_config)
    return NoiseSchedule.from_config({**CLASS_DEFAULTS.get(sampler, {}), **scheduler_config})


def default_guidance(sampler):
    """The few-step (LCM / Flash) samplers run without CFG; the others with SD's usual 7.5."""
    return 0.0 if sampler in ("flash", "lcm") else 7.5


@torch.no_grad()
def generate(pipe, prompts=None, **kwargs):
    """Prompts -> float images (len(prompts) * batch, 3, H, W) in [0, 1], image i*batch + j for prompt i:
    generate_chunks (same arguments) gathered."""
    return torch.cat(list(generate_chunks(pipe, prompts, **kwargs)))


@torch.no_grad()
def generate_chunks(pipe, prompts=None, steps=4, sampler="flash", guidance=None, height=None, width=None,
                    seed=0, generator=None, negative_prompt=None, batch=1, progress=True, eta=0.0,
                    prompt_embeds=None, negative_embeds=None, image=None, mask=None, upscale=None,
                    adapter_image=None, adapter_scale=1.0, kept=4):
    """Prompts -> float images in [0, 1], yielded in chunks (C, 3, H, W) of budget.denoise_chunk images
    (all of them when they fit one chunk), in the order image i*batch + j for prompt i.

    The initial latents are drawn as diffusers draws them: randn (B, C, H/f, W/f) from `generator` (by
    default torch.Generator("cpu").manual_seed(seed)) in the model dtype; the same generator then gives the
    LCM re-noising draws. guidance <= 1 means no CFG (None: 0 for flash/lcm, 7.5 otherwise).
    prompt_embeds / negative_embeds: already encoded Conditioning instead of prompts (diffusers' arguments
    of the same names); the negative one is needed only when guiding.
    Task pipelines (module docstring), condition images (1 or one per prompt, c, H, W) in [0, 1]:
    inpaint: image + mask at the output size; upscale: image (low-res) and the integer factor `upscale`;
    adapter: adapter_image at the output size, its features scaled by adapter_scale.
    Chunks: the noise of a chunk, then its sampler's draws, come from the generator before the next chunk's
    (a list of generators: each image's own); within one chunk the draws are diffusers'. The memory
    estimate (flash/budget.py; `kept` bytes per value of the images the caller keeps) is checked first.
    """
    guidance = default_guidance(sampler) if guidance is None else float(guidance)
    for name, value in (("guidance", guidance), ("adapter_scale", float(adapter_scale))):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if prompt_embeds is not None:
        cond, uncond = prompt_embeds, (negative_embeds if guidance > 1 else None)
        if guidance > 1 and uncond is None:
            raise ValueError("guidance > 1 with prompt_embeds needs negative_embeds too")
    else:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        if not prompts:
            raise ValueError("no prompts given")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    n = len(prompts) if prompt_embeds is None else cond.context.shape[0]
    asked = (height, width)
    height, width = task_size(pipe, n, height, width, image, mask, upscale, adapter_image)
    height, width = height or pipe.default_size, width or pipe.default_size
    from_image = pipe.task != "text-to-image" and asked == (None, None)
    what = f"the low-res image x {upscale}" if upscale else "the condition image"
    check_size(pipe, height, width, what if from_image else None)
    check_memory(pipe, n * batch, height, width, guidance > 1, kept)
    channels = pipe.vae.config.latent_channels
    want = channels + extra_channels(pipe.task, channels)
    if pipe.denoiser.config.in_channels != want:
        raise ValueError(f"the denoiser takes {pipe.denoiser.config.in_channels} input channels; this {pipe.task} "
                         f"pipeline needs {want} (latent {channels} + {want - channels} condition channels)")

    if prompt_embeds is None:
        cond, uncond = encode_prompt(pipe, prompts, negative_prompt, guidance=guidance > 1)
    cond = cond.repeat(batch)
    uncond = None if uncond is None else uncond.repeat(batch)

    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    f, total = pipe.vae_scale_factor, cond.context.shape[0]
    schedule = schedule_for(sampler, pipe.scheduler_config)
    if steps > max_steps(sampler, schedule):
        raise ValueError(f"steps: {sampler} takes at most {max_steps(sampler, schedule)} steps on this model's "
                         f"schedule, got {steps}")
    step = denoise_chunk(height, width)
    image_cond = None
    with _progress(steps * math.ceil(total / step), progress, sampler) as bar:
        for first in range(0, total, step):
            rows = slice(first, min(first + step, total))
            gen = generator[rows] if isinstance(generator, (list, tuple)) else generator
            noise = randn((rows.stop - first, channels, height // f, width // f), gen, pipe.device, pipe.dtype)
            if image_cond is None:
                # After the noise: diffusers' inpainting pipeline draws the masked-image latent sample second.
                image_cond = task_condition(pipe, height, width, image, mask, adapter_image, adapter_scale, generator)
            prompt_of = torch.arange(first, rows.stop) // batch
            chunk_cond = {k: each_tensor(v, lambda x: x.to(pipe.device).expand(n, *x.shape[1:])[prompt_of.to(pipe.device)])
                          for k, v in image_cond.items()}
            model_fn = make_model_fn(pipe, _slice(cond, rows), None if uncond is None else _slice(uncond, rows),
                                     guidance, height, width, chunk_cond)

            def counted(x, t):
                out = model_fn(x, t)
                bar.update(1)
                return out
            if isinstance(schedule, FlowSchedule):
                yield decode(pipe, sample_flow(sampler, counted, noise, steps, schedule, gen))
            else:
                yield decode(pipe, sample(sampler, counted, noise, steps, schedule, gen, eta=eta))


def _slice(c, rows):
    return Conditioning(*(None if v is None else v[rows] for v in c))


def _progress(total, enabled, desc):
    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)
