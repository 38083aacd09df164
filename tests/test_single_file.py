"""Single-file (CompVis / SGM layout) checkpoints: weights/single_file.py's rules and weights.load_pipeline.

The files are made here from tiny diffusers pipelines (built by tests/test_pipeline_loading.py's helpers) by
an INDEPENDENT inverse of the rules, written below from the layout description (not by running our rules
backwards): diffusers names -> LDM / SGM names, q/k/v fused back into OpenCLIP's in_proj, text_projection
transposed, the VAE attention as 1x1 convs, plus the extra keys real files carry (EMA copies, DDPM buffers,
position_ids). diffusers' own single-file loader reads these files back to the same weights, so the inverse
is the real layout, not a mirror of our rules. Loaded by weights.load_pipeline, every weight must equal the
diffusers folder's bitwise, and every output (tokenizer ids, text states, VAE, UNet) match diffusers.
Family detection and the config-from-shapes rules are checked on full-size layouts built on the meta device.
"""
import pytest
import torch
from safetensors.torch import save_file

import weights
from flash import clip, unet, vae
from flash.io import CheckpointError
from test_pipeline_loading import check_sd, make_sd, make_sdxl
from weights import single_file

# Config fields that shapes cannot show: heads and GroupNorm groups of the tiny models.
TINY_OVERRIDES = {
    "sd15": dict(unet_config={"attention_head_dim": 2, "norm_num_groups": 8}, vae_config={"norm_num_groups": 8},
                 text_encoder_config={"num_attention_heads": 2}),
    "sd2": dict(unet_config={"attention_head_dim": [2, 4, 4], "norm_num_groups": 8},
                vae_config={"norm_num_groups": 8}, text_encoder_config={"num_attention_heads": 2}),
    "sdxl": dict(unet_config={"attention_head_dim": [1, 2, 4], "norm_num_groups": 8},
                 vae_config={"norm_num_groups": 8}, text_encoder_config={"num_attention_heads": 2},
                 text_encoder_2_config={"num_attention_heads": 2}),
}
TINY_OVERRIDES["inpaint"] = TINY_OVERRIDES["sd15"]


# ------------------------------------------------------------------------- the inverse: diffusers -> LDM

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_to_ldm(sd, layers_per_block):
    """LDM numbers every sub-module of a level in one flat list: per level, layers_per_block (resnet, attention)
    pairs and then the down/upsampler (input_blocks start after conv_in, hence the 1 +)."""
    n = layers_per_block + 1
    up_with_attention = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[0] == "mid_block":
            index = {"resnets0": 0, "attentions0": 1, "resnets1": 2}[p[1] + p[2]]
            head, kind, rest = f"middle_block.{index}", p[1], p[3:]
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            head, kind, rest = f"input_blocks.{1 + int(p[1]) * n + layers_per_block}.0.op", None, p[5:]
        elif p[0] == "down_blocks":
            head = f"input_blocks.{1 + int(p[1]) * n + int(p[3])}.{0 if p[2] == 'resnets' else 1}"
            kind, rest = p[2], p[4:]
        elif p[0] == "up_blocks" and p[2] == "upsamplers":
            b = int(p[1])
            sub = 2 if b in up_with_attention else 1          # after the resnet [and the attention]
            head, kind, rest = f"output_blocks.{b * n + layers_per_block}.{sub}.conv", None, p[5:]
        elif p[0] == "up_blocks":
            head = f"output_blocks.{int(p[1]) * n + int(p[3])}.{0 if p[2] == 'resnets' else 1}"
            kind, rest = p[2], p[4:]
        else:
            name, leaf = key.rsplit(".", 1)
            out[f"{UNET_TOP[name]}.{leaf}"] = value
            continue
        if kind == "resnets":
            rest = [RESNET[rest[0]]] + rest[1:]
        out[".".join([head] + rest)] = value
    return out


def vae_to_ldm(sd):
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[0] not in ("encoder", "decoder"):
            out[key] = value                                            # quant_conv, post_quant_conv
            continue
        side = p[0]
        if p[1] in ("down_blocks", "up_blocks"):
            level = int(p[2]) if side == "encoder" else levels - 1 - int(p[2])   # LDM's up list is by resolution
            name = "down" if side == "encoder" else "up"
            if p[3] == "resnets":
                key = f"{side}.{name}.{level}.block.{p[4]}." + ".".join(p[5:])
            else:
                key = f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + p[-1]
        elif p[1] == "mid_block" and p[2] == "resnets":
            key = f"{side}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
        elif p[1] == "mid_block":
            key = f"{side}.mid.attn_1.{attention[p[4]]}.{p[-1]}"
            if p[4] != "group_norm" and p[-1] == "weight":
                value = value[:, :, None, None]                         # LDM's attention uses 1x1 convs
        elif p[1] == "conv_norm_out":
            key = f"{side}.norm_out.{p[-1]}"
        out[key.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def hf_clip_to_ldm(sd, prefix):
    """transformers' names stay; the checkpoints of the time carry the `text_model.` wrapper and position_ids."""
    out = {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def openclip_to_sgm(sd, prefix, extra_layer=False):
    """transformers CLIP names -> OpenCLIP's: fused in_proj, bare positional_embedding, x @ text_projection.
    extra_layer: add the last resblock SD2's file has but diffusers' SD2 text encoder drops (plus a projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers + extra_layer):
        src = f"encoder.layers.{min(i, layers - 1)}."
        scale = 2.0 if i == layers else 1.0                     # the dropped layer differs from the kept ones
        dst = f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [sd[src + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"]
            out[dst + f"attn.in_proj_{leaf}"] = scale * torch.cat(qkv)
            for ours, theirs in names.items():
                out[dst + f"{theirs}.{leaf}"] = scale * sd[src + f"{ours}.{leaf}"]
    if extra_layer:
        out["text_projection"] = torch.randn(out["ln_final.weight"].shape[0], 16)
    return {prefix + k: v for k, v in out.items()}


def to_single_file(pipe, kind):
    """A diffusers pipeline -> one state dict in the layout of the released single files."""
    lpb = pipe.unet.config.layers_per_block
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), lpb).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    if kind == "sdxl":
        sd.update(hf_clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_sgm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif kind == "sd2":
        sd.update(openclip_to_sgm(pipe.text_encoder.state_dict(), "cond_stage_model.model.", extra_layer=True))
    else:
        sd.update(hf_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    # Training state real files carry, which a loader must skip: the DDPM buffers and EMA weights.
    sd["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = sd["model.diffusion_model.input_blocks.0.0.weight"] + 1
    return sd


def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def diffusers_names(pipe, component):
    """A component's state dict with transformers' `text_model.` wrapper restored (transformers 5 drops it)."""
    sd = getattr(pipe, component).state_dict()
    if component.startswith("text_encoder"):
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    return sd


KINDS = {"sd15": "sd15", "sd2": "sd2", "sdxl": "sdxl", "inpaint": "sd15"}   # tiny pipeline -> family


@pytest.fixture(scope="module", params=list(KINDS))
def tiny(request, tmp_path_factory):
    """(kind, diffusers pipeline, its folder, the same pipeline as a single .safetensors file)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    ref = make_sdxl(root / "pipe") if kind == "sdxl" else make_sd(root / "pipe", kind)
    return kind, ref, root / "pipe", save(to_single_file(ref, kind), root / f"{kind}.safetensors")


# ----------------------------------------------------------------------------------------------- tests

def test_inverse_is_the_real_layout(tiny):
    """diffusers' own single-file converters read the files made here back to the original weights, so the
    test inverse writes the real CompVis / SGM layout (and is not merely the mirror image of our rules)."""
    from diffusers.loaders import single_file_utils as hf
    kind, ref, _, path = tiny
    sd = to_single_file(ref, kind)
    got = {"unet": hf.convert_ldm_unet_checkpoint(sd, dict(ref.unet.config)),
           "vae": hf.convert_ldm_vae_checkpoint(sd, dict(ref.vae.config))}
    if kind == "sdxl":
        got["text_encoder"] = hf.convert_ldm_clip_checkpoint(sd, "conditioner.embedders.0.transformer.")
        got["text_encoder_2"] = hf.convert_open_clip_checkpoint(ref.text_encoder_2, sd,
                                                                "conditioner.embedders.1.model.")
    elif kind == "sd2":
        # diffusers drops SD2's last OpenCLIP layer by its full-size index (23); here the model's size decides.
        got["text_encoder"] = {k: v for k, v in hf.convert_open_clip_checkpoint(ref.text_encoder, sd).items()
                               if not k.startswith(("text_model.encoder.layers.2.", "text_projection"))}
    else:
        got["text_encoder"] = hf.convert_ldm_clip_checkpoint(sd)
    for component, state in got.items():
        want = diffusers_names(ref, component)
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        assert state.keys() == want.keys(), component
        assert all(torch.equal(state[k], want[k]) for k in want), component


def test_single_file_loads_exactly(tiny):
    """Every weight equals the folder's bitwise; every output equals our folder-loaded pipeline's bitwise and
    diffusers' within 1e-5 (tokenizers, text encoders, VAE encode/decode, UNet)."""
    kind, ref, folder, path = tiny
    pipe = weights.load_pipeline(path, **TINY_OVERRIDES[kind])
    from_folder = weights.load_pipeline(folder)
    assert pipe.family == from_folder.family == KINDS[kind] and pipe.transformer is None
    assert pipe.inpainting == from_folder.inpainting == (kind == "inpaint")
    pairs = [(pipe.unet, from_folder.unet), (pipe.vae, from_folder.vae)] + list(zip(pipe.text_encoders,
                                                                                       from_folder.text_encoders))
    assert len(pipe.text_encoders) == len(from_folder.text_encoders) == len(pipe.tokenizers)
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.unet.config.block_out_channels == from_folder.unet.config.block_out_channels
    assert pipe.vae.config.scaling_factor == from_folder.vae.config.scaling_factor
    check_sd(pipe, ref)                                        # against diffusers / transformers, <= 1e-5
    with torch.no_grad():                                      # against our folder load: bitwise
        for tok, tok_ref, enc, enc_ref in zip(pipe.tokenizers, from_folder.tokenizers, pipe.text_encoders,
                                              from_folder.text_encoders):
            ids = tok(["a photo of a cat", "wow!!"])[0]
            assert torch.equal(ids, tok_ref(["a photo of a cat", "wow!!"])[0])
            assert all(torch.equal(a, b) for a, b in zip(enc(ids), enc_ref(ids)))
        x = torch.randn(1, 3, 16, 16)
        a, b = pipe.vae, from_folder.vae
        assert torch.equal(a.decode(a.encode(x).mean), b.decode(b.encode(x).mean))
        z = torch.randn(1, pipe.unet.config.in_channels, 8, 8)
        ctx = torch.randn(1, 5, pipe.unet.config.cross_attention_dim)
        added = None
        if kind == "sdxl":
            added = {"text_embeds": torch.randn(1, 24), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        assert torch.equal(pipe.unet(z, 500, ctx, added), from_folder.unet(z, 500, ctx, added))


def test_scheduler_and_tokenizers_of_single_files(tiny):
    kind, _, _, path = tiny
    pipe = weights.load_pipeline(path, **TINY_OVERRIDES[kind])
    s = pipe.scheduler_config
    assert (s["beta_schedule"], s["beta_start"], s["beta_end"], s["steps_offset"], s["prediction_type"]) == \
        ("scaled_linear", 0.00085, 0.012, 1, "epsilon")
    pads = {"sd15": [49407], "inpaint": [49407], "sd2": [0], "sdxl": [49407, 0]}[kind]
    assert [t.pad_token_id for t in pipe.tokenizers] == pads
    assert pipe.tokenizers[0](["a photo of a cat"])[0][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.config.get("force_zeros_for_empty_prompt", False) == (kind == "sdxl")


def test_prediction_type_and_family_override(tmp_path):
    """v-prediction (SD2-768) cannot be seen in the keys: the argument sets it, and the SD2 preset with it."""
    ref = make_sd(tmp_path / "pipe", "sd2")
    path = save(to_single_file(ref, "sd2"), tmp_path / "sd2.safetensors")
    pipe = weights.load_pipeline(path, family="sd2", prediction_type="v_prediction", dtype=torch.float16,
                                 **TINY_OVERRIDES["sd2"])
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    assert pipe.unet.config.sample_size == 96 and pipe.unet.config.upcast_attention   # the 768-v preset
    assert pipe.unet.conv_in.weight.dtype == torch.float16
    assert pipe.text_encoders[0].text_model.final_layer_norm.weight.dtype == torch.float16
    with pytest.raises(CheckpointError, match="text_encoder_2"):   # a wrong family names what is missing
        weights.load_pipeline(path, family="sdxl", **TINY_OVERRIDES["sd2"])
    xl = save(to_single_file(make_sdxl(tmp_path / "xl"), "sdxl"), tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="family='sd15' does not fit"):
        weights.load_pipeline(xl, family="sd15", **TINY_OVERRIDES["sdxl"])


def meta_layout(family):
    """The full-size released models of a family on the meta device (flash's key tree == diffusers'), and the
    single-file state dict made from them by the test inverse: no memory is used."""
    with torch.device("meta"):
        unet_cfg = unet.CONFIGS["sd2-base" if family == "sd2" else family]
        models = {"unet": unet.UNet2DConditionModel(unet_cfg),
                  "vae": vae.AutoencoderKL(vae.CONFIGS["sdxl" if family == "sdxl" else "sd"])}
        if family == "sdxl":
            models["text_encoder"] = clip.CLIPTextModel(clip.CONFIGS["clip-l"])
            models["text_encoder_2"] = clip.CLIPTextModel(clip.CONFIGS["openclip-bigg"])
        else:
            text = single_file.OPENCLIP_H if family == "sd2" else clip.CONFIGS["clip-l"]
            models["text_encoder"] = clip.CLIPTextModel(text)

    class Pipe:   # what to_single_file reads
        pass
    pipe = Pipe()
    for name, model in models.items():
        setattr(pipe, name, model)
    return models, to_single_file(pipe, family)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_full_size_layouts_on_meta(family):
    """The rules cover the released layouts key for key, the family is detected, and configs read from the
    shapes equal the presets (SD1.5 859,520,964 UNet params; SDXL 2,567,463,684)."""
    models, sd = meta_layout(family)
    assert single_file.detect_family(sd) == family
    parts = single_file.convert(sd, family)
    for name, model in models.items():
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in parts[name][1].items()} == want, name
    pooled = 1280 if family == "sdxl" else None
    cfg = single_file.unet_config(parts["unet"][1], family, pooled)
    assert unet.UNetConfig.from_config_json(cfg) == models["unet"].config
    assert vae.VAEConfig.from_config_json(single_file.vae_config(parts["vae"][1], family)) == models["vae"].config
    for name in [n for n in models if n.startswith("text_encoder")]:
        naming, state = parts[name]
        assert single_file.clip_config(state, naming, family) == models[name].config
    n = sum(p.numel() for p in models["unet"].parameters())
    assert n == {"sd15": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}[family]


def test_family_detection():
    """From the keys: SGM conditioner / label_emb -> SDXL; OpenCLIP cond_stage_model or 1024-wide
    cross-attention -> SD2; else SD1.x. Inpainting is read from conv_in (9 input channels)."""
    def keys(*names, ctx=768):
        sd = {name: torch.empty(0, device="meta") for name in names}
        to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        sd[to_k] = torch.empty(320, ctx, device="meta")
        return sd
    assert single_file.detect_family(keys("cond_stage_model.transformer.text_model.final_layer_norm.weight")) == "sd15"
    assert single_file.detect_family(keys("cond_stage_model.model.ln_final.weight", ctx=1024)) == "sd2"
    assert single_file.detect_family(keys(ctx=1024)) == "sd2"          # a UNet-only file
    assert single_file.detect_family(keys(ctx=768)) == "sd15"
    assert single_file.detect_family(keys("conditioner.embedders.1.model.ln_final.weight", ctx=2048)) == "sdxl"
    assert single_file.detect_family(keys("model.diffusion_model.label_emb.0.0.weight", ctx=2048)) == "sdxl"
    with pytest.raises(CheckpointError, match="refiner"):
        single_file.detect_family(keys("conditioner.embedders.0.model.ln_final.weight", ctx=1280))
    with pytest.raises(CheckpointError, match="not a CompVis"):
        single_file.detect_family({"encoder.conv_in.weight": torch.empty(0)})
    models, sd = meta_layout("sd15")
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    sd[conv_in] = torch.empty(320, 9, 3, 3, device="meta")
    parts = single_file.convert(sd, "sd15")
    cfg = unet.UNetConfig.from_config_json(single_file.unet_config(parts["unet"][1], "sd15"))
    assert cfg == unet.CONFIGS["sd15-inpaint"]


def test_errors(tmp_path):
    kind, ref = "sd15", make_sd(tmp_path / "pipe")
    sd = to_single_file(ref, kind)
    path = save(sd, tmp_path / "sd15.safetensors")
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        bad = tmp_path / f"model{suffix}"
        bad.write_bytes(b"\x80\x02}q\x00.")                     # a (tiny) pickle: refused, never opened
        with pytest.raises(CheckpointError) as e:
            weights.load_pipeline(bad)
        assert str(e.value).startswith(f"{bad}: pickle checkpoints are refused")
    no_vae = save({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.safetensors: no vae .*first_stage_model\."):
        weights.load_pipeline(no_vae, **TINY_OVERRIDES[kind])
    with pytest.raises(CheckpointError, match="unet_config override: unknown fields heads"):
        weights.load_pipeline(path, unet_config={"heads": 2})
    with pytest.raises(CheckpointError, match="num_attention_heads in text_encoder_config"):
        weights.load_pipeline(path, **dict(TINY_OVERRIDES[kind], text_encoder_config={"num_attention_heads": 5}))
    # Without the overrides the presets' head / group counts do not fit the tiny UNet: one line naming the file.
    with pytest.raises(CheckpointError, match=str(path.name)):
        weights.load_pipeline(path, text_encoder_config={"num_attention_heads": 2})
    pixart = save({"x_embedder.proj.weight": torch.zeros(4, 4, 2, 2), "t_block.1.weight": torch.zeros(2, 2)},
                  tmp_path / "pixart.safetensors")
    with pytest.raises(CheckpointError, match="load_transformer"):
        weights.load_pipeline(pixart)
    with pytest.raises(ValueError, match="pixart"):
        weights.load_pipeline(path, family="pixart")
