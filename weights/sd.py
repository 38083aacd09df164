"""Load Stable Diffusion components (UNet, VAE, tiny VAE (TAESD), T2I-Adapter) from diffusers component folders.

A component folder is `config.json` + `diffusion_pytorch_model.safetensors` (or a sharded
`*.safetensors.index.json`, or the `.fp16` variants). The model is built on the meta device from the config
and the tensors read from the file become its parameters (flash.io.load_into, strict): since flash's module
trees equal diffusers' key trees, the only conversion is one rule for an older diffusers VAE layout:
- diffusers < 0.14 saved the VAE mid-block attention as `query`, `key`, `value`, `proj_attn` (and the LDM
  release as 1x1 convs): renamed to `to_q`, `to_k`, `to_v`, `to_out.0`, with 1x1 conv weights squeezed.

`build_unet` / `build_vae` (config -> model on meta) and `load_state` are shared with the single-file
(CompVis / SGM) loader, which only has to turn its keys into diffusers keys first.
"""
import re
from pathlib import Path

import torch

from flash.adapter import AdapterConfig, T2IAdapter
from flash.unet import UNet2DConditionModel, UNetConfig
from flash.taesd import AutoencoderTiny, TinyVAEConfig
from flash.vae import AutoencoderKL, VAEConfig
from flash.io import CheckpointError, find_weights, load_into, read_config, read_weights

WEIGHTS_STEM = "diffusion_pytorch_model"
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _build(config_cls, model_cls, config, source):
    """A config dataclass or a diffusers config dict -> the model on the meta device (no storage)."""
    try:
        cfg = config if isinstance(config, config_cls) else config_cls.from_config_json(config, source)
    except (TypeError, ValueError) as e:
        raise _config_error(e, source) from None
    with torch.device("meta"):
        return model_cls(cfg)


def build_unet(config, source="unet config"):
    """A UNetConfig or a diffusers config dict -> UNet2DConditionModel on the meta device."""
    return _build(UNetConfig, UNet2DConditionModel, config, source)


def build_vae(config, source="vae config"):
    """A VAEConfig or a diffusers config dict -> AutoencoderKL on the meta device."""
    return _build(VAEConfig, AutoencoderKL, config, source)


def build_tiny_vae(config, source="AutoencoderTiny config"):
    """A TinyVAEConfig or a diffusers AutoencoderTiny config dict -> flash.taesd.AutoencoderTiny on meta."""
    return _build(TinyVAEConfig, AutoencoderTiny, config, source)


def build_adapter(config, source="adapter config"):
    """An AdapterConfig or a diffusers T2IAdapter config dict -> T2IAdapter on the meta device."""
    return _build(AdapterConfig, T2IAdapter, config, source)


def _config_error(e, source):
    """One-line CheckpointError that names the config file (the config classes already prefix it)."""
    msg = str(e)
    return CheckpointError(msg if msg.startswith(source) else f"{source}: {msg}")


def vae_keys(state):
    """Old diffusers names of the VAE mid-block attention -> current diffusers names; 1x1-conv weights of
    those projections (the LDM layout, after its own renaming) -> Linear weights."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)", key)
        if m:
            key = m.group(1) + _OLD_VAE_ATTENTION[m.group(2)] + "." + m.group(3)
        if value.ndim == 4 and re.fullmatch(r".*mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight", key):
            value = value[:, :, 0, 0]           # a 1x1 conv is a Linear on the channel axis
        out[key] = value
    return out


def vae_dtype(vae_config, dtype):
    """force_upcast VAEs (SDXL's overflows in fp16) get fp32 weights whatever dtype is asked for
    (None, "keep the file's dtype", included: their fp16 files are upcast)."""
    if dtype in (None, torch.float16, torch.bfloat16) and vae_config.force_upcast:
        return torch.float32
    return dtype


def load_state(model, state, source, dtype=torch.float32):
    """Assign a diffusers-named state dict to a meta-built UNet / VAE (cast to dtype; None keeps the file's)."""
    if isinstance(model, AutoencoderKL):
        state = vae_keys(state)
        dtype = vae_dtype(model.config, dtype)
    return load_into(model, state, source=source, dtype=dtype)


def _load_component(folder, build, dtype, variant):
    folder = Path(folder)
    model = build(read_config(folder), source=str(folder / "config.json"))
    path = find_weights(folder, WEIGHTS_STEM, variant=variant)
    state = read_weights(path)
    return load_state(model, state, str(path), dtype)


def load_unet(folder, dtype=torch.float32, variant=None):
    """A diffusers `unet/` folder -> flash.unet.UNet2DConditionModel in eval mode.

    dtype: floating tensors are cast to it (None keeps the file's dtype). variant="fp16" prefers the
    `.fp16` files when both exist; a folder with only the fp16 files is read without asking.
    """
    return _load_component(folder, build_unet, dtype, variant)


def load_vae(folder, dtype=torch.float32, variant=None):
    """A diffusers `vae/` folder -> flash.vae.AutoencoderKL in eval mode (fp32 if its config says force_upcast)."""
    return _load_component(folder, build_vae, dtype, variant)


def load_tiny_vae(folder, dtype=torch.float32, variant=None):
    """A diffusers AutoencoderTiny folder (taesd, taesdxl, taesd3) -> flash.taesd.AutoencoderTiny."""
    return _load_component(folder, build_tiny_vae, dtype, variant)


def load_adapter(folder, dtype=torch.float32, variant=None):
    """A diffusers T2IAdapter folder (`adapter/` of a StableDiffusionAdapterPipeline) -> flash.adapter.T2IAdapter."""
    return _load_component(folder, build_adapter, dtype, variant)
