"""weights.load_pipeline: a whole model, text-to-image or a task pipeline (denoiser, VAE, text encoders,
tokenizers, scheduler config, T2I-Adapter) from a diffusers pipeline folder or a Stable Diffusion single-file
checkpoint, as a flash.pipeline.Pipeline.

- A pipeline folder (`model_index.json` + one folder per component, as diffusers' `save_pretrained` writes
  it): the `_class_name` says SD (1.x / 2.x), SDXL or PixArt-alpha; each component is read by its own
  loader (weights.sd, weights.text, weights.pixart, flash.tokenizer). Text encoders and tokenizers are
  optional: a component set to null in model_index.json, or whose folder (or tokenizer vocabulary) is
  absent, is left out of the lists, so `text_encoders` / `tokenizers` may be shorter or empty (tiny PixArt
  test folders have no T5 vocabulary). Whoever encodes prompts must check; the lists keep their order
  (text_encoder before text_encoder_2).
- A single `.safetensors` file in the CompVis / SGM layout: keys converted by weights/single_file.py's rules,
  family detected from the keys, configs from shapes + presets; tokenizers from the CLIP vocabulary shipped
  in weights/clip_vocab/ (pad with <|endoftext|>, except SD2's tokenizer and SDXL's tokenizer_2, which pad
  with "!" as their released tokenizer folders say); the released SD scheduler config.
- Pickles (.ckpt, .pt, .pth, .bin) are refused with the io module's message.

Family: "sd15" | "sd2" | "sdxl" | "pixart" | "sd3" (SD3 / SD3.5: a StableDiffusion3Pipeline folder, whose
text_encoder_3 / tokenizer_3, T5, may be absent or null). SD2 is told from SD1.x by its UNet (linear projections or
1024-wide cross-attention). Task pipelines (flash/tasks.py) keep their base family and set `pipe.task`:
- "inpaint": a StableDiffusion[XL]InpaintPipeline folder, or any UNet with in_channels 9 (single files);
- "adapter": a StableDiffusion[XL]AdapterPipeline folder, whose `adapter/` T2IAdapter goes to `pipe.adapter`;
- "upscale": a "FlashUpscalePipeline" folder. This is flash's own `_class_name`, not a diffusers class (the
  latent super-resolution model of flash/tasks.py: the SD components, a UNet taking 2 x latent channels);
  diffusers cannot load such a folder.
`"flash_base": "<path relative to this folder>"` in model_index.json (flash's own key, written by
weights.save.save_pipeline(..., base=)): every component folder missing here is read from that pipeline
folder instead, so a task model ships only its UNet or adapter and shares the base's VAE, text encoders,
tokenizers and scheduler. The base's model_index.json supplies the keys this one lacks.
Every model is built on the meta device and its tensors assigned from the file (one copy of the weights).
"""
from pathlib import Path

import torch

from flash import clip
from flash.config_check import checked_kwargs
from flash.lora import load_lora
from flash.pipeline import Pipeline
from flash.schedule import NoiseSchedule
from flash.tokenizer import CLIP_EOS, clip_tokenizer, load_tokenizer, read_clip_vocab
from flash.io import CheckpointError, load_into, read_config, read_safetensors, refuse_pickle
from weights import single_file
from weights.pixart import is_original_layout, load_transformer
from weights.sd3 import is_original_layout as is_sd3_layout, load_mmdit
from weights.sd import build_unet, build_vae, load_adapter, load_state, load_unet, load_vae
from weights.text import load_text_encoder

FAMILIES = ("sd15", "sd2", "sdxl", "pixart", "sd3")
TRANSFORMER_KINDS = ("pixart", "sd3")  # pipelines whose denoiser is a transformer/ (each its own kind)
CLIP_VOCAB = Path(__file__).parent / "clip_vocab"

# model_index.json `_class_name` -> which kind of pipeline. The img2img / inpaint / adapter pipelines share the
# components of their text-to-image sibling; FlashUpscalePipeline is flash's own name (module docstring).
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionAdapterPipeline": "sd", "FlashUpscalePipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl", "StableDiffusionXLAdapterPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart", "StableDiffusion3Pipeline": "sd3",
}
# `_class_name` -> flash.tasks task (any other class: text-to-image).
TASK_CLASSES = {"StableDiffusionInpaintPipeline": "inpaint", "StableDiffusionXLInpaintPipeline": "inpaint",
                "StableDiffusionAdapterPipeline": "adapter", "StableDiffusionXLAdapterPipeline": "adapter",
                "FlashUpscalePipeline": "upscale"}

# The schedulers released with the models (their scheduler_config.json), for single files and for folders
# that lack a scheduler/ folder. SD1.x/2.x/XL share the "scaled_linear" betas (linear in sqrt(beta) from
# 0.00085 to 0.012) and steps_offset 1. The SD2 768 models predict v, which their keys cannot show: pass
# prediction_type="v_prediction" for them.
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 trained_betas=None, prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False, timestep_spacing="leading")
SCHEDULER_CONFIGS = {
    "sd15": dict(_class_name="PNDMScheduler", skip_prk_steps=True, **_SD_BETAS),
    "sd2": dict(_class_name="PNDMScheduler", skip_prk_steps=True, **_SD_BETAS),
    "sdxl": dict(_class_name="EulerDiscreteScheduler", interpolation_type="linear", use_karras_sigmas=False,
                 **_SD_BETAS),
    "pixart": dict(_class_name="DPMSolverMultistepScheduler", num_train_timesteps=1000, beta_start=0.0001,
                   beta_end=0.02, beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                   timestep_spacing="linspace", steps_offset=0),
    # SD3 / SD3.5: rectified flow (flash/flow.py), the released shift 3.0.
    "sd3": dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0),
}
# What a single file's model_index.json would say (diffusers' defaults for these pipelines).
PIPELINE_CONFIGS = {
    "sd15": {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False},
    "sd2": {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False},
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
}
PIXART_MAX_LENGTH = 120  # PixArt-alpha encodes captions as 120 T5 tokens


def load_pipeline(path, dtype=torch.float32, variant=None, family=None, prediction_type=None,
                  unet_config=None, vae_config=None, text_encoder_config=None, text_encoder_2_config=None):
    """A diffusers pipeline folder or a single-file SD checkpoint -> flash.pipeline.Pipeline (eval mode).

    dtype: floating weights are cast to it (None keeps the file's; force_upcast VAEs stay fp32).
    variant="fp16": prefer the `.fp16` files of a folder. family: override the detected family.
    prediction_type: "epsilon" | "v_prediction", overrides the scheduler config's.
    unet_config / vae_config / text_encoder_config / text_encoder_2_config (single files only): dicts of
    config fields that win over the presets and shapes (head counts and GroupNorm groups of custom
    models, e.g. tiny test ones, cannot be read from shapes).
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r} is not 'epsilon' or 'v_prediction'")
    overrides = dict(unet=unet_config, vae=vae_config, text_encoder=text_encoder_config,
                     text_encoder_2=text_encoder_2_config)
    if path.is_dir():
        given = [f"{k}_config" for k, v in overrides.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)}: config overrides apply to single-file checkpoints; "
                             f"{path} is a folder, edit its config.json files instead")
        pipe = load_folder(path, dtype, variant, family)
    else:
        refuse_pickle(path)
        if path.exists() and path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: neither a pipeline folder nor a .safetensors single-file checkpoint")
        pipe = load_single_file(path, dtype, family, prediction_type, overrides)
    if prediction_type is not None:
        pipe.scheduler_config = {**pipe.scheduler_config, "prediction_type": prediction_type}
    if pipe.task == "text-to-image" and pipe.unet is not None and pipe.unet.config.in_channels == 9:
        pipe.task = "inpaint"     # a single file, or a text-to-image folder holding an inpainting UNet
    return pipe


def load_pipeline_with_loras(path, dtype=torch.float32, device="cpu", loras=(), fuse=True):
    """load_pipeline(path, dtype) moved to `device`, with each (LoRA path, scale) of `loras` loaded into its
    denoiser (flash.lora.load_lora): fused (several stack, and sampling pays nothing for them; sample.py) or
    attached as adapters (one, switched off for the teacher and fused for the student; eval.py)."""
    pipe = load_pipeline(path, dtype=dtype).to(device=device)
    for lora, scale in loras:
        load_lora(pipe.denoiser, lora, scale=scale, fuse=fuse)
    return pipe


# ---------------------------------------------------------------------------------------------- folders

def sd_family(config):
    """"sdxl" | "sd2" | "sd15" from a UNetConfig: SDXL has the text_time micro-conditioning; SD2 (and only
    it, among the rest) uses linear proj_in/out and 1024-wide OpenCLIP-H text states."""
    if config.addition_embed_type == "text_time":
        return "sdxl"
    if config.use_linear_projection or 1024 in config.levels("cross_attention_dim"):
        return "sd2"
    return "sd15"


def _has_vocabulary(folder):
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or any(
        (folder / name).is_file() for name in ("spiece.model", "tokenizer.json"))


def read_index(root):
    """model_index.json of a pipeline folder, its `_class_name` and kind ("sd" | "sdxl" | "pixart")."""
    if not (root / "model_index.json").is_file() and (root / "config.json").is_file():
        raise CheckpointError(f"{root}: a component folder (config.json, no model_index.json); load it with "
                              f"weights.load_unet / load_vae / load_transformer / load_text_encoder")
    index = read_config(root, "model_index.json")
    name = index.get("_class_name")
    kind = PIPELINE_CLASSES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise CheckpointError(f"{root / 'model_index.json'}: _class_name {name!r} is not supported "
                              f"(supported: {', '.join(PIPELINE_CLASSES)})")
    return index, name, kind


def read_base(root, index, kind):
    """The folder named by `flash_base` (relative to root) and its model_index.json, or (None, {})."""
    rel = index.get("flash_base")
    if rel is None:
        return None, {}
    where = f"{root / 'model_index.json'}: flash_base {rel!r}"
    base = (root / str(rel)).resolve()
    if not isinstance(rel, str) or not (base / "model_index.json").is_file():
        raise CheckpointError(f"{where} is not a pipeline folder (no {base / 'model_index.json'})")
    try:
        base_index, _, base_kind = read_index(base)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if "flash_base" in base_index:
        raise CheckpointError(f"{where}: the base has a flash_base of its own (chains are not supported)")
    if (base_kind in TRANSFORMER_KINDS or kind in TRANSFORMER_KINDS) and base_kind != kind:
        raise CheckpointError(f"{where}: a {base_index['_class_name']} cannot supply components to a "
                              f"{index['_class_name']}")
    return base, base_index


def load_folder(root, dtype=torch.float32, variant=None, family=None):
    index, name, kind = read_index(root)
    if family is not None and (family in TRANSFORMER_KINDS or kind in TRANSFORMER_KINDS) and family != kind:
        raise ValueError(f"family={family!r} does not fit {root}, a {name}")
    base, base_index = read_base(root, index, kind)

    def find(component):
        """The component's folder: here, else the base's; listed with a class (not [null, null])."""
        for folder, listing in ((root, index), (base, base_index)):
            entry = listing.get(component)
            if folder is None or entry is None:
                continue
            if not (isinstance(entry, list) and len(entry) == 2):
                raise CheckpointError(f"{folder / 'model_index.json'}: {component} must be [library, class] "
                                      f"(or [null, null]), got {str(entry)[:60]}")
            if entry[-1] is not None and (folder / component).is_dir():
                return folder / component
        return None

    task = TASK_CLASSES.get(name, "text-to-image")
    denoiser = "transformer" if kind in TRANSFORMER_KINDS else "unet"
    for component in (denoiser, "vae") + (("adapter",) if task == "adapter" else ()):
        if find(component) is None:
            source = root if base is None else f"{root} (or its flash_base {base})"
            raise CheckpointError(f"{source}: a {name} needs a {component}/ folder listed in model_index.json")

    text_encoders, tokenizers = [], []
    pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    pairs += (("text_encoder_3", "tokenizer_3"),) if kind == "sd3" else ()  # T5, optional (flash/sd3.py)
    for encoder, tokenizer in pairs:
        if find(encoder):
            text_encoders.append(load_text_encoder(find(encoder), dtype=dtype, variant=variant))
        if find(tokenizer) and _has_vocabulary(find(tokenizer)):
            max_length = PIXART_MAX_LENGTH if kind == "pixart" else None
            tokenizers.append(load_tokenizer(find(tokenizer), max_length=max_length))

    vae = load_vae(find("vae"), dtype=dtype, variant=variant)
    if kind == "pixart":
        family, unet, transformer = "pixart", None, load_transformer(find("transformer"), dtype, variant)
    elif kind == "sd3":
        family, unet, transformer = "sd3", None, load_mmdit(find("transformer"), dtype, variant)
    else:
        unet, transformer = load_unet(find("unet"), dtype=dtype, variant=variant), None
        family = family or sd_family(unet.config)
    adapter = load_adapter(find("adapter"), dtype=dtype, variant=variant) if task == "adapter" else None
    schedulers = [d / "scheduler" for d in (root, base) if d and (d / "scheduler" / "scheduler_config.json").is_file()]
    if schedulers:
        scheduler = read_config(schedulers[0], "scheduler_config.json")
        # its fields checked now (the schedule itself is built per sampler, at sampling time)
        checked_kwargs(NoiseSchedule, {k: v for k, v in scheduler.items() if k != "trained_betas"},
                       schedulers[0] / "scheduler_config.json")
    else:
        scheduler = dict(SCHEDULER_CONFIGS[family])
    return Pipeline(family=family, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                    scheduler_config=scheduler, unet=unet, transformer=transformer,
                    config={**base_index, **index}, task=task, adapter=adapter)


# ------------------------------------------------------------------------------------------ single file

def clip_tokenizers(family):
    """The released tokenizers of a family, from the shipped CLIP vocabulary: SD1.x pads with
    <|endoftext|>; SD2's OpenCLIP tokenizer and SDXL's tokenizer_2 pad with "!" (id 0)."""
    vocab, merges = read_clip_vocab(CLIP_VOCAB / "vocab.json", CLIP_VOCAB / "merges.txt")
    pads = {"sd15": [CLIP_EOS], "sd2": ["!"], "sdxl": [CLIP_EOS, "!"]}[family]
    return [clip_tokenizer(vocab, merges, pad_token=pad) for pad in pads]


def load_single_file(path, dtype=torch.float32, family=None, prediction_type=None, overrides=None):
    overrides = overrides or {}
    state = read_safetensors(path)
    if is_original_layout(state):
        raise CheckpointError(f"{path}: a PixArt transformer in its original layout, not a whole pipeline; load it "
                              f"with weights.load_transformer (or load a PixArt pipeline folder)")
    if is_sd3_layout(state):
        raise CheckpointError(f"{path}: an SD3 / SD3.5 single file; whole-pipeline SD3 single files are not supported "
                              f"yet: load its transformer with weights.sd3.load_mmdit, or a StableDiffusion3Pipeline folder")
    if family in TRANSFORMER_KINDS:
        raise ValueError(f"family={family!r} needs a pipeline folder; {path} is a single file")
    family = family or single_file.detect_family(state, str(path))
    parts = single_file.convert(state, family, str(path))
    del state   # from here each tensor is referenced once, by its component's dict

    text_encoders = []
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            naming, sd = parts.pop(name)
            cfg = single_file.clip_config(sd, naming, family, overrides.get(name), what=f"{name}_config")
            with torch.device("meta"):
                model = clip.CLIPTextModel(cfg)
            text_encoders.append(load_into(model, sd, source=f"{path} ({name})", dtype=dtype))

    # SDXL's pooled text width (text_encoder_2's projection) fixes the size of each micro-conditioning id.
    pooled = text_encoders[1].config.projection_dim if family == "sdxl" else None
    sd = parts.pop("unet")[1]
    cfg = single_file.unet_config(sd, family, pooled, overrides.get("unet"), prediction_type)
    unet = load_state(build_unet(cfg, source=f"{path} (unet config)"), sd, f"{path} (unet)", dtype)
    sd = parts.pop("vae")[1]
    cfg = single_file.vae_config(sd, family, overrides.get("vae"))
    vae = load_state(build_vae(cfg, source=f"{path} (vae config)"), sd, f"{path} (vae)", dtype)

    return Pipeline(family=family, vae=vae, text_encoders=text_encoders, tokenizers=clip_tokenizers(family),
                    scheduler_config=dict(SCHEDULER_CONFIGS[family]), unet=unet, config=dict(PIPELINE_CONFIGS[family]))
