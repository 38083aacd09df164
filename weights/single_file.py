"""Single-file Stable Diffusion checkpoints (the CompVis "LDM" layout of SD1.x/2.x and Stability's "SGM"
layout of SDXL) -> diffusers key names, plus family and config detection from the keys and shapes.

A single file holds every component under one prefix each (PREFIXES). After the prefix the names are those
of the original code: CompVis' `openaimodel.UNetModel` (flat `input_blocks` / `middle_block` /
`output_blocks` lists of numbered sub-layers), its `Encoder` / `Decoder` VAE, transformers' CLIPTextModel
(SD1.x and SDXL's first encoder: already the names we use) or OpenCLIP's text tower (SD2.x, SDXL's second
encoder). Each layout is turned into diffusers names by a short ORDERED list of (regex, replacement) rules:
every rule is applied in turn to every key with `re.sub`, so a key is first moved to its diffusers block and
then its inner names are translated (a rule never sees the names an earlier rule produced by accident, as
no replacement re-creates an LDM name). Tensor changes that renaming cannot express are separate, explicit
steps: the VAE attention's 1x1 convs become Linear weights, OpenCLIP's fused `in_proj` is split into q/k/v
and its `text_projection` (used as x @ P) is transposed into a Linear weight (x @ W.T).

Configs: a single file has no config.json. The family is read from the keys (detect_family; `family=`
overrides it); everything the tensor shapes determine (channels per level, layers per block, attention
depth per level, cross-attention width, linear vs conv projections, in_channels -- 9 for inpainting --,
SDXL's micro-conditioning sizes, text widths and depths, vocabulary size) is read from them, and the rest
comes from the family's preset in flash/unet.py, flash/vae.py, flash/clip.py. Shapes cannot show head
counts or GroupNorm group counts: the presets' rules are used (SD1.x: 8 heads; SD2/SDXL and every text
tower: 64-wide heads; 32 groups), and `unet_config=` / `vae_config=` / `text_encoder_config=` dicts override
any field (needed for tiny test models; harmless for the released ones).
Deviations: SDXL refiner files (OpenCLIP at `conditioner.embedders.0`) and SD2 "v" vs "eps" are not told
apart by keys (the latter is the loader's `prediction_type=`); keys outside PREFIXES are training state
(`model_ema.*`, the DDPM schedule buffers `betas`, `alphas_cumprod`, ...) and are ignored.
"""
import re
from dataclasses import asdict, replace

from flash.clip import CONFIGS as CLIP_CONFIGS
from flash.clip import CLIPTextConfig
from flash.unet import CONFIGS as UNET_CONFIGS
from flash.vae import CONFIGS as VAE_CONFIGS
from flash.io import CheckpointError
from weights.text import clip_keys

FAMILIES = ("sd15", "sd2", "sdxl")

# checkpoint prefix -> (diffusers component, naming of what follows the prefix)
PREFIXES = {
    "model.diffusion_model.": ("unet", "ldm"),
    "first_stage_model.": ("vae", "ldm"),
    "cond_stage_model.transformer.": ("text_encoder", "hf"),             # SD1.x: OpenAI CLIP ViT-L/14
    "cond_stage_model.model.": ("text_encoder", "openclip"),             # SD2.x: OpenCLIP ViT-H/14
    "conditioner.embedders.0.transformer.": ("text_encoder", "hf"),      # SDXL: OpenAI CLIP ViT-L/14
    "conditioner.embedders.1.model.": ("text_encoder_2", "openclip"),    # SDXL: OpenCLIP ViT-bigG/14
}
# OpenCLIP ViT-H/14 text tower as SD2 uses it. SD2 conditions on the PENULTIMATE layer followed by ln_final,
# so diffusers' SD2 text encoder keeps 23 of the 24 layers (convert() drops the last one).
OPENCLIP_H = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, hidden_act="gelu", eos_token_id=2, projection_dim=512)


def rename(key, rules):
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


# ---------------------------------------------------------------------------------------------- UNet

def unet_rules(layers_per_block):
    """LDM UNetModel -> diffusers UNet2DConditionModel. LDM keeps one flat list per direction: `input_blocks`
    holds conv_in, then per level `layers_per_block` [ResBlock, SpatialTransformer] entries and (except at the
    last level) one Downsample; `output_blocks` holds per level `layers_per_block + 1` [ResBlock,
    SpatialTransformer, Upsample] entries. So with n = layers_per_block + 1 entries per level, entry i is
    level i // n, layer i % n (input_blocks counted after conv_in)."""
    n = layers_per_block + 1

    def down(m, kind):
        level, layer = divmod(int(m[1]) - 1, n)
        return f"down_blocks.{level}.{kind}.{layer}."

    def up(m, kind):
        level, layer = divmod(int(m[1]), n)
        return f"up_blocks.{level}.{kind}.{layer}."

    return [
        # The timestep and SDXL size/crop MLPs are nn.Sequential(Linear, SiLU, Linear) in LDM.
        (r"^time_embed\.0\.", "time_embedding.linear_1."),
        (r"^time_embed\.2\.", "time_embedding.linear_2."),
        (r"^label_emb\.0\.0\.", "add_embedding.linear_1."),
        (r"^label_emb\.0\.2\.", "add_embedding.linear_2."),
        (r"^input_blocks\.0\.0\.", "conv_in."),
        (r"^out\.0\.", "conv_norm_out."),                 # out = Sequential(GroupNorm, SiLU, Conv)
        (r"^out\.2\.", "conv_out."),
        (r"^middle_block\.0\.", "mid_block.resnets.0."),
        (r"^middle_block\.1\.", "mid_block.attentions.0."),
        (r"^middle_block\.2\.", "mid_block.resnets.1."),
        # The downsampler has its own input_blocks entry (the level's last), a conv named `op`.
        (r"^input_blocks\.(\d+)\.0\.op\.", lambda m: f"down_blocks.{(int(m[1]) - 1) // n}.downsamplers.0.conv."),
        (r"^input_blocks\.(\d+)\.0\.", lambda m: down(m, "resnets")),
        (r"^input_blocks\.(\d+)\.1\.", lambda m: down(m, "attentions")),
        # The upsampler shares the level's last output_blocks entry: sub-layer 1 without attention, 2 with.
        # Only it has a direct `conv` child (a SpatialTransformer has norm / proj_in / ...), so it goes first.
        (r"^output_blocks\.(\d+)\.[12]\.conv\.", lambda m: f"up_blocks.{int(m[1]) // n}.upsamplers.0.conv."),
        (r"^output_blocks\.(\d+)\.0\.", lambda m: up(m, "resnets")),
        (r"^output_blocks\.(\d+)\.1\.", lambda m: up(m, "attentions")),
        # Inside a ResBlock: in_layers = (GroupNorm, SiLU, Conv), emb_layers = (SiLU, Linear),
        # out_layers = (GroupNorm, SiLU, Dropout, Conv). SpatialTransformer internals already match diffusers.
        (r"\.in_layers\.0\.", ".norm1."),
        (r"\.in_layers\.2\.", ".conv1."),
        (r"\.emb_layers\.1\.", ".time_emb_proj."),
        (r"\.out_layers\.0\.", ".norm2."),
        (r"\.out_layers\.3\.", ".conv2."),
        (r"\.skip_connection\.", ".conv_shortcut."),
    ]


def _indices(keys, pattern):
    return {int(m[1]) for m in map(re.compile(pattern).match, keys) if m}


def convert_unet(state, source="checkpoint"):
    """LDM-named UNet tensors (prefix removed) -> diffusers names. The number of levels is read from the
    downsamplers, layers_per_block from the length of output_blocks."""
    levels = 1 + len(_indices(state, r"input_blocks\.(\d+)\.0\.op\."))
    outputs = len(_indices(state, r"output_blocks\.(\d+)\."))
    if not outputs or outputs % levels:
        raise CheckpointError(f"{source}: {outputs} UNet output_blocks do not split into {levels} levels")
    rules = unet_rules(outputs // levels - 1)
    return {rename(k, rules): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------- VAE

def vae_rules(levels):
    """LDM Encoder/Decoder -> diffusers AutoencoderKL. The decoder's `up` list is indexed by resolution
    level (up.0 is the FULL resolution, run last) while diffusers' up_blocks are in execution order."""
    flip = lambda m: levels - 1 - int(m[1])  # noqa: E731
    return [
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{flip(m)}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{flip(m)}.upsamplers.0."),
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
        (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"\.norm_out\.", ".conv_norm_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),     # the 1x1 conv where a ResBlock changes width
    ]


def convert_vae(state):
    levels = len(_indices(state, r"decoder\.up\.(\d+)\."))
    rules = vae_rules(levels)
    out = {}
    for key, value in state.items():
        if key.startswith("loss."):     # the training loss (LPIPS / discriminator) some files still carry
            continue
        key = rename(key, rules)
        if re.search(r"attentions\.0\.to_(q|k|v|out\.0)\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]   # LDM's attention projections are 1x1 convs: a Linear on channels
        out[key] = value
    return out


# -------------------------------------------------------------------------------------- text encoders

OPENCLIP_RULES = [
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),  # a bare Parameter
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.attn\.in_proj_(weight|bias)$", r".self_attn.in_proj.\1"),   # split into q/k/v by convert_openclip
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^text_projection$", "text_projection.weight"),                   # transposed by convert_openclip
]
OPENCLIP_DROPPED = ("logit_scale", "attn_mask")  # the contrastive temperature; the causal mask (recomputed)


def convert_openclip(state):
    out = {}
    for key, value in state.items():
        if key in OPENCLIP_DROPPED:
            continue
        key = rename(key, OPENCLIP_RULES)
        if ".self_attn.in_proj." in key:
            # nn.MultiheadAttention stacks the q, k, v projections along the output dim. clone(): views would
            # keep sharing one storage, which safetensors refuses to save (a transient copy of in_proj only).
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[key.replace("in_proj", name)] = part.clone()
        elif key == "text_projection.weight":
            out[key] = value.t().contiguous()   # OpenCLIP computes x @ P; a Linear computes x @ W.T
        else:
            out[key] = value
    return out


def drop_last_layer(state):
    """SD2 uses OpenCLIP's penultimate layer (then ln_final): drop the last layer and the unused projection."""
    last = max(_indices(state, r"text_model\.encoder\.layers\.(\d+)\."))
    return {k: v for k, v in state.items()
            if not k.startswith((f"text_model.encoder.layers.{last}.", "text_projection."))}


# ---------------------------------------------------------------------------------- split and detect

def detect_family(state_dict, source="checkpoint"):
    """"sd15" | "sd2" | "sdxl" from the keys of a CompVis / SGM single file (inpainting is orthogonal:
    it is the UNet's in_channels, read from conv_in's shape by unet_config)."""
    keys = list(state_dict)
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointError(f"{source}: an SDXL refiner checkpoint (OpenCLIP as the only text encoder) is not "
                              "supported")
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    context = [v.shape[-1] for k, v in state_dict.items()
               if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")]
    if context:
        return "sd2" if context[0] == 1024 else "sd15"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd15"
    raise CheckpointError(f"{source}: no model.diffusion_model.* keys, so not a CompVis / SGM Stable Diffusion "
                          f"checkpoint (keys look like {', '.join(sorted(keys)[:3])})")


def convert(state_dict, family, source="checkpoint"):
    """A whole single-file state dict -> {component: (naming, diffusers-named state dict)}.

    Components: unet, vae, text_encoder[, text_encoder_2]; naming is "hf" or "openclip" for text encoders
    (it decides the activation: OpenAI CLIP uses quick_gelu, OpenCLIP gelu)."""
    parts = {}
    for key, value in state_dict.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            component, naming = PREFIXES[prefix]
            parts.setdefault(component, (naming, {}))[1][key[len(prefix):]] = value
    missing = [c for c in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
               if c not in parts]
    if missing:
        want = [p for p, (c, _) in PREFIXES.items() if c in missing]
        raise CheckpointError(f"{source}: no {', '.join(missing)} in this {family} checkpoint "
                              f"(expected keys under {' or '.join(want)})")
    if family != "sdxl" and "text_encoder_2" in parts:
        raise CheckpointError(f"{source}: holds SDXL's second text encoder (conditioner.embedders.1), so "
                              f"family={family!r} does not fit it")
    out = {}
    for component, (naming, state) in parts.items():
        if component == "unet":
            state = convert_unet(state, source)
        elif component == "vae":
            state = convert_vae(state)
        elif naming == "openclip":
            state = convert_openclip(state)
            if family == "sd2":
                state = drop_last_layer(state)
        else:
            state = clip_keys(state)    # transformers-version quirks (text_model. wrapper, position_ids)
        out[component] = (naming, state)
    return out


# ------------------------------------------------------------------------------ configs from shapes

def _one_or_list(values):
    """A per-level field as upstream writes it: one int when every level agrees, else a tuple."""
    return values[0] if len(set(values)) == 1 else tuple(values)


def _merge(preset, detected, override, what):
    """preset < what the shapes say < the caller's override. An override may only name preset fields."""
    unknown = sorted(set(override or {}) - set(preset))
    if unknown:
        raise CheckpointError(f"{what} override: unknown fields {', '.join(unknown)} (known: {', '.join(preset)})")
    return {**preset, **detected, **(override or {})}


def unet_config(state, family, pooled_dim=None, override=None, prediction_type=None):
    """A diffusers-named UNet state dict -> a UNetConfig dict (preset + shapes + override).

    pooled_dim: width of SDXL's pooled text embedding (text_encoder_2's projection), from which the size of
    each micro-conditioning embedding follows: label_emb input = pooled_dim + 6 * addition_time_embed_dim."""
    name = {"sd15": "sd15", "sdxl": "sdxl", "sd2": "sd2" if prediction_type == "v_prediction" else "sd2-base"}[family]
    preset = asdict(UNET_CONFIGS[name])
    levels = 1 + len(_indices(state, r"down_blocks\.(\d+)\.downsamplers\."))
    channels = [state[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in range(levels)]

    def depth(prefix):  # transformer blocks in the first attention of a level (None: no attention there)
        blocks = _indices(state, re.escape(prefix) + r"\.attentions\.0\.transformer_blocks\.(\d+)\.")
        return len(blocks) or None

    down_depth = [depth(f"down_blocks.{b}") for b in range(levels)]
    up_attn = [depth(f"up_blocks.{b}") is not None for b in range(levels)]
    # diffusers' mid block takes the last level's depth; levels without attention ignore theirs (1).
    depths = [d or 1 for d in down_depth[:-1]] + [down_depth[-1] or depth("mid_block") or 1]
    proj_in = state.get("mid_block.attentions.0.proj_in.weight")
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    detected = dict(
        in_channels=state["conv_in.weight"].shape[1],      # 9 for inpainting: latent 4 + mask 1 + masked 4
        out_channels=state["conv_out.weight"].shape[0],
        block_out_channels=tuple(channels),
        layers_per_block=len(_indices(state, r"down_blocks\.0\.resnets\.(\d+)\.")),
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        transformer_layers_per_block=_one_or_list(depths),
        cross_attention_dim=preset["cross_attention_dim"] if to_k is None else to_k.shape[1],
        use_linear_projection=proj_in is not None and proj_in.ndim == 2,
    )
    if family != "sd15":    # SD2 and SDXL use 64-wide heads (the field counts heads, see flash/unet.py)
        detected["attention_head_dim"] = _one_or_list([max(c // 64, 1) for c in channels])
    if "add_embedding.linear_1.weight" in state:
        total = state["add_embedding.linear_1.weight"].shape[1]
        detected.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=total)
        if pooled_dim is not None:  # 6 size/crop ids, each embedded to addition_time_embed_dim
            detected["addition_time_embed_dim"] = (total - pooled_dim) // 6
    return _merge(preset, detected, override, "unet_config")


def vae_config(state, family, override=None):
    preset = asdict(VAE_CONFIGS["sdxl" if family == "sdxl" else "sd"])
    levels = 1 + len(_indices(state, r"encoder\.down_blocks\.(\d+)\.downsamplers\."))
    detected = dict(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        block_out_channels=tuple(state[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"].shape[0]
                                 for b in range(levels)),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=len(_indices(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        latent_channels=state["post_quant_conv.weight"].shape[1] if "post_quant_conv.weight" in state
        else state["decoder.conv_in.weight"].shape[1],
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state,
    )
    return _merge(preset, detected, override, "vae_config")


def clip_config(state, naming, family, override=None, what="text_encoder_config"):
    """A diffusers-named CLIP text state dict -> CLIPTextConfig. OpenAI's CLIP ("hf" naming) uses quick_gelu,
    OpenCLIP gelu; every released SD text tower has 64-wide heads; eos_token_id 2 = the released configs'
    legacy "argmax of the ids" pooling rule (see flash/clip.py)."""
    if naming == "hf":
        preset = CLIP_CONFIGS["clip-l"]
    else:
        preset = OPENCLIP_H if family == "sd2" else CLIP_CONFIGS["openclip-bigg"]
    vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
    detected = dict(
        vocab_size=vocab, hidden_size=width, num_attention_heads=max(width // 64, 1),
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        with_projection="text_projection.weight" in state,
    )
    if detected["with_projection"]:
        detected["projection_dim"] = state["text_projection.weight"].shape[0]
    config = _merge(asdict(preset), detected, override, what)
    if config["num_attention_heads"] < 1 or config["hidden_size"] % config["num_attention_heads"]:
        raise CheckpointError(f"text encoder: hidden_size {config['hidden_size']} does not split into "
                              f"{config['num_attention_heads']} heads; pass num_attention_heads in {what}")
    return replace(preset, **config)
