"""Write a flash Pipeline (or one component) as the folders diffusers and transformers write, so that
`weights.load_pipeline` and diffusers' `StableDiffusionPipeline.from_pretrained` both read it back.

    folder/model_index.json                        which pipeline class, and [library, class] per component
    folder/unet/ (or transformer/)  config.json + diffusion_pytorch_model.safetensors      (diffusers)
    folder/vae/                     config.json + diffusion_pytorch_model.safetensors      (diffusers)
    folder/text_encoder[_2]/        config.json (with `architectures`) + model.safetensors (transformers)
    folder/tokenizer[_2]/           vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json
                                    (CLIP, the files of the released SD folders); tokenizer.json for T5
    folder/scheduler/scheduler_config.json

Each config.json is the component's config dataclass under its upstream field names (flash.unet.UNetConfig,
flash.vae.VAEConfig, flash.dit.PixArtConfig, flash.clip.CLIPTextConfig, flash.t5.T5Config), plus the fixed
fields this project's models always have (act_fn "silu", PixArt's adaLN-single, ...), which the loaders
check. Every file is written atomically (temp file + rename): a crash leaves the previous file or none.

Choices: the safety checker and feature extractor are [null, null] and requires_safety_checker false, so
diffusers loads the folder offline with nothing to fetch. CLIP weights keep the `text_model.` prefix of
transformers 4 saves (the released SD checkpoints; transformers 5 reads it too, see weights/text.py); T5
keeps only `shared.weight` of its tied embedding pair, as transformers 5 saves it.

Task pipelines (`pipe.task`, flash/tasks.py) are saved under the class that runs them: inpaint as a
StableDiffusion[XL]InpaintPipeline, adapter as a StableDiffusion[XL]AdapterPipeline with its T2IAdapter in
`adapter/` (both load in diffusers), upscale as "FlashUpscalePipeline", flash's own name (no diffusers
class runs flash's latent super-resolution). With `base=` only the task's own component is written (unet/
for inpaint and upscale, adapter/ for adapter) and model_index.json says `"flash_base": <base relative to
the folder>`: weights.load_pipeline reads every other component from that folder. Such a folder is flash's
own (diffusers cannot load it) and is only as right as its base: the base must hold the VAE, text encoders
and (for an adapter) the UNet the task model was trained with.
"""
import dataclasses
import json
import os
from pathlib import Path

from flash import clip, t5
from flash.adapter import AdapterConfig
from flash.dit import PixArtConfig
from flash.io import write_json, write_safetensors, write_text
from flash.lora import lora_modules
from flash.unet import UNetConfig
from flash.vae import VAEConfig
from weights.pipeline import SCHEDULER_CONFIGS

DIFFUSERS_VERSION = "0.42.1"        # the diffusers release whose folder layout this writes
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

# Fields diffusers' classes have that our models fix to one value (the loaders refuse any other).
UNET_FIXED = {"act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False,
              "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
              "num_class_embeds": None, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
              "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default", "mid_block_scale_factor": 1,
              "dropout": 0.0}
VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
PIXART_FIXED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_type": "default",
                "norm_elementwise_affine": False, "num_embeds_ada_norm": 1000, "upcast_attention": False,
                "dropout": 0.0, "norm_num_groups": 32}

PIPELINE_CLASSES = {  # (family, task) -> model_index.json _class_name (a diffusers pipeline, but the upscaler)
    **{(f, "text-to-image"): "StableDiffusionPipeline" for f in ("sd15", "sd2")},
    **{(f, "inpaint"): "StableDiffusionInpaintPipeline" for f in ("sd15", "sd2")},
    **{(f, "adapter"): "StableDiffusionAdapterPipeline" for f in ("sd15", "sd2")},
    ("sdxl", "text-to-image"): "StableDiffusionXLPipeline", ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "adapter"): "StableDiffusionXLAdapterPipeline",
    **{(f, "upscale"): "FlashUpscalePipeline" for f in ("sd15", "sd2", "sdxl")},
    ("pixart", "text-to-image"): "PixArtAlphaPipeline",
}
TASK_NAMES = {"text-to-image": "text-to-image", "inpaint": "inpainting", "upscale": "super-resolution",
              "adapter": "T2I-Adapter"}
OWN_COMPONENT = {"inpaint": "unet", "upscale": "unet", "adapter": "adapter"}   # what a base-relative folder holds


def write_weights(state, path):
    write_safetensors(state, path, metadata={"format": "pt"})


def state_for_saving(model, dtype=None, drop=()):
    """The model's state dict, floating tensors cast to `dtype` (None keeps them), without the `drop` keys
    (the second name of a tied parameter: safetensors refuses two names for one storage).

    LoRA adapters fused into the weights (flash.lora.fuse_lora) are saved as part of them; adapters that
    are not fused are refused, since the base weights alone would silently be the model without them."""
    adapters = lora_modules(model)
    unfused = sorted(n for n, m in adapters.items() if not m.merged)
    if unfused:
        raise ValueError(f"{type(model).__name__} has {len(unfused)} unfused LoRA adapters (e.g. {unfused[0]}): "
                         "save them with flash.lora.save_lora, or fuse_lora(model) to save the fused weights")
    out = {}
    for key, value in model.state_dict().items():
        if key in drop or (adapters and (".lora_A." in key or ".lora_B." in key)):
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.detach().cpu()
    return out


def _plain(cfg):
    """A config dataclass -> JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _dtype_name(model, dtype):
    dtype = dtype or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------- components

def unet_config(cfg: UNetConfig):
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
            **UNET_FIXED, **_plain(cfg)}


def vae_config(cfg: VAEConfig):
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **VAE_FIXED, **_plain(cfg)}


def adapter_config(cfg: AdapterConfig):
    return {"_class_name": "T2IAdapter", "_diffusers_version": DIFFUSERS_VERSION, **_plain(cfg)}


def pixart_config(cfg: PixArtConfig):
    return {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **PIXART_FIXED, **_plain(cfg)}


def text_encoder_config(model, dtype=None):
    """transformers config.json of a CLIPTextModel(WithProjection) or T5EncoderModel."""
    cfg = model.config
    if isinstance(cfg, t5.T5Config):
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", **_plain(cfg),
                "dense_act_fn": "gelu_new", "is_gated_act": True, "pad_token_id": 0, "eos_token_id": 1,
                "decoder_start_token_id": 0, "dropout_rate": 0.0, "torch_dtype": _dtype_name(model, dtype)}
    plain = {k: v for k, v in _plain(cfg).items() if k != "with_projection"}
    arch = "CLIPTextModelWithProjection" if cfg.with_projection else "CLIPTextModel"
    # bos / pad are the ids of CLIP's vocabulary; the model itself only reads eos_token_id (pooling).
    return {"architectures": [arch], "model_type": "clip_text_model", **plain, "bos_token_id": 49406,
            "pad_token_id": 49407, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
            "initializer_range": 0.02, "torch_dtype": _dtype_name(model, dtype)}


def _save_diffusers(model, folder, dtype, config_json):
    folder = Path(folder)
    write_weights(state_for_saving(model, dtype), folder / DIFFUSERS_WEIGHTS)
    write_json(config_json(model.config), folder / "config.json")
    return folder


def save_unet(model, folder, dtype=None):
    """A flash UNet2DConditionModel -> a diffusers `unet/` folder."""
    return _save_diffusers(model, folder, dtype, unet_config)


def save_vae(model, folder, dtype=None):
    """A flash AutoencoderKL -> a diffusers `vae/` folder."""
    return _save_diffusers(model, folder, dtype, vae_config)


def save_adapter(model, folder, dtype=None):
    """A flash T2IAdapter -> a diffusers T2IAdapter folder (`adapter/`)."""
    return _save_diffusers(model, folder, dtype, adapter_config)


def save_transformer(model, folder, dtype=None):
    """A flash PixArtTransformer2DModel -> a diffusers `transformer/` folder."""
    return _save_diffusers(model, folder, dtype, pixart_config)


def save_text_encoder(model, folder, dtype=None):
    """A flash CLIPTextModel / T5EncoderModel -> a transformers folder (config.json + model.safetensors)."""
    folder = Path(folder)
    drop = ("encoder.embed_tokens.weight",) if isinstance(model, t5.T5EncoderModel) else ()
    if not isinstance(model, (t5.T5EncoderModel, clip.CLIPTextModel)):
        raise ValueError(f"save_text_encoder: {type(model).__name__} is not a CLIPTextModel or T5EncoderModel")
    write_weights(state_for_saving(model, dtype, drop), folder / TRANSFORMERS_WEIGHTS)
    write_json(text_encoder_config(model, dtype), folder / "config.json")
    return folder


def save_tokenizer(tokenizer, folder):
    """A flash.tokenizer.TextTokenizer -> a tokenizer folder that flash.tokenizer.load_tokenizer and
    transformers read: CLIP as vocab.json + merges.txt (the BPE model's own tables), T5 as tokenizer.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = tokenizer.backend
    token = backend.id_to_token
    specials = {"eos_token": token(tokenizer.eos_token_id), "pad_token": token(tokenizer.pad_token_id)}
    if tokenizer.kind == "clip":
        model = json.loads(backend.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        write_json(model["vocab"], folder / "vocab.json", indent=0, sort_keys=False)
        write_text("#version: 0.2\n" + "\n".join(merges) + "\n", folder / "merges.txt")
        specials.update(bos_token=token(tokenizer.bos_token_id), unk_token=specials["eos_token"])
        config = {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace",
                  "add_prefix_space": False}
    else:
        write_text(backend.to_str(), folder / "tokenizer.json")
        unk = json.loads(backend.to_str())["model"].get("unk_id")
        if unk is not None:
            specials["unk_token"] = token(unk)
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0}   # the sentinels are in tokenizer.json
    write_json(specials, folder / "special_tokens_map.json")
    write_json({**config, **specials, "model_max_length": tokenizer.model_max_length},
               folder / "tokenizer_config.json")
    return folder


# --------------------------------------------------------------------------------------------- pipeline

def scheduler_config(pipe):
    """The pipeline's scheduler config, with the class diffusers should build (the family's released one
    when the config names none)."""
    config = dict(pipe.scheduler_config or SCHEDULER_CONFIGS[pipe.family])
    config.setdefault("_class_name", SCHEDULER_CONFIGS[pipe.family]["_class_name"])
    config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    return config


def save_pipeline(pipe, folder, dtype=None, base=None):
    """A flash.pipeline.Pipeline -> a diffusers pipeline folder (see the module docstring).

    dtype: floating weights are stored in it (e.g. torch.float16 halves the folder); None keeps each
    model's own. base: a pipeline folder (path) that supplies every component but the task's own, which
    alone is written here (task pipelines only). The models are not changed (tensors are copied to the
    CPU for writing).
    """
    key = (pipe.family, pipe.task)
    if key not in PIPELINE_CLASSES:
        raise ValueError(f"save_pipeline: no diffusers pipeline class for family {pipe.family!r}"
                         f" ({TASK_NAMES.get(pipe.task, pipe.task)})")
    if pipe.task == "adapter" and pipe.adapter is None:
        raise ValueError("save_pipeline: an adapter pipeline without an adapter (pipe.adapter is None)")
    if len(pipe.text_encoders) > 2 or len(pipe.tokenizers) > 2:
        raise ValueError(f"save_pipeline: {len(pipe.text_encoders)} text encoders / {len(pipe.tokenizers)} "
                         "tokenizers, at most 2 of each")
    if base is not None:
        if pipe.task not in OWN_COMPONENT:
            raise ValueError(f"save_pipeline: base= is for task pipelines ({', '.join(OWN_COMPONENT)}), "
                             f"this one is {pipe.task}")
        if not (Path(base) / "model_index.json").is_file():
            raise ValueError(f"save_pipeline: base {str(base)!r} is not a pipeline folder (no model_index.json)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINE_CLASSES[key], "_diffusers_version": DIFFUSERS_VERSION}
    if base is not None:
        return _save_task_only(pipe, folder, dtype, base, index)

    parts = ["vae", "transformer" if pipe.family == "pixart" else "unet"]
    if pipe.task == "adapter":
        parts.append("adapter")
    for name in parts:
        _save_part(pipe, name, folder, dtype, index)

    names = ["", "_2"] if pipe.family == "sdxl" else [""]
    for i, suffix in enumerate(names):
        encoder = pipe.text_encoders[i] if i < len(pipe.text_encoders) else None
        tokenizer = pipe.tokenizers[i] if i < len(pipe.tokenizers) else None
        if encoder is None:
            index["text_encoder" + suffix] = [None, None]
        else:
            save_text_encoder(encoder, folder / ("text_encoder" + suffix), dtype)
            arch = text_encoder_config(encoder)["architectures"][0]
            index["text_encoder" + suffix] = ["transformers", arch]
        if tokenizer is None:
            index["tokenizer" + suffix] = [None, None]
        else:
            save_tokenizer(tokenizer, folder / ("tokenizer" + suffix))
            cls = "CLIPTokenizer" if tokenizer.kind == "clip" else "T5Tokenizer"
            index["tokenizer" + suffix] = ["transformers", cls]

    scheduler = scheduler_config(pipe)
    write_json(scheduler, folder / "scheduler" / "scheduler_config.json")
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    # The optional components each diffusers class takes (its __init__ refuses others), left empty so
    # that diffusers loads the folder offline with nothing to fetch.
    if pipe.family == "sdxl":
        index["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        index["feature_extractor"] = index["image_encoder"] = [None, None]
    elif pipe.family != "pixart":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        if pipe.task != "adapter":       # StableDiffusionAdapterPipeline has no IP-adapter image encoder
            index["image_encoder"] = [None, None]
    write_json(index, folder / "model_index.json")
    return folder


# component folder (= the Pipeline attribute holding it) -> (its saver, its diffusers class)
PARTS = {"vae": (save_vae, "AutoencoderKL"), "unet": (save_unet, "UNet2DConditionModel"),
         "transformer": (save_transformer, "PixArtTransformer2DModel"), "adapter": (save_adapter, "T2IAdapter")}


def save_component(model, name, folder, dtype=None):
    """A model -> the diffusers component folder FOLDER/NAME ("vae", "unet", "transformer", "adapter")."""
    return PARTS[name][0](model, Path(folder) / name, dtype)


def _save_part(pipe, name, folder, dtype, index):
    save_component(getattr(pipe, name), name, folder, dtype)
    index[name] = ["diffusers", PARTS[name][1]]


def _save_task_only(pipe, folder, dtype, base, index):
    """The task's own component and a model_index.json pointing at `base` for the rest."""
    _save_part(pipe, OWN_COMPONENT[pipe.task], folder, dtype, index)
    index["flash_base"] = Path(os.path.relpath(Path(base).resolve(), folder.resolve())).as_posix()
    write_json(index, folder / "model_index.json")
    return folder


def folder_size(folder):
    """Bytes of every file under `folder` (for reports: the shipped folder must stay small)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
