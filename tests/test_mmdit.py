"""flash/mmdit.py against diffusers' SD3Transformer2DModel (the oracle).

Tiny random configs (SD3-style; SD3.5-style with RMS qk-norm and MMDiT-X dual-attention blocks) are saved by
diffusers and read by weights.sd3.load_mmdit: fp32 outputs within 1e-5, at a non-square size whose token
grid is smaller than the positional table (so the centre crop is exercised). Full-size released configs
are built on the meta device on both sides: equal parameter counts, key sets and shapes.
"""
import json
from dataclasses import replace

import pytest
import torch
from diffusers import SD3Transformer2DModel

from flash.io import CheckpointError
from flash.mmdit import CONFIGS, SD3Config, build
from helpers import maxdiff, randomize
from weights.sd3 import load_mmdit

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
            pos_embed_max_size=12)
VARIANTS = {"sd3": {}, "sd3.5": {"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}}

# The released transformer/config.json values (facts, written out): stabilityai/stable-diffusion-3-medium-
# diffusers, stable-diffusion-3.5-medium and stable-diffusion-3.5-large. Fields not listed are diffusers'
# defaults (sample_size 128, patch_size 2, in/out channels 16, attention_head_dim 64, joint_attention_dim
# 4096, pooled_projection_dim 2048).
RELEASED = {
    "sd3-medium": {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                   "pos_embed_max_size": 192},
    "sd3.5-medium": {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                     "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"},
    "sd3.5-large": {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                    "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": "rms_norm"},
}
COMMON = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
          "joint_attention_dim": 4096, "pooled_projection_dim": 2048}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    theirs = randomize(SD3Transformer2DModel(**TINY, **VARIANTS[request.param]), 1)
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    theirs.save_pretrained(folder)
    return request.param, theirs, load_mmdit(folder), folder


def inputs(seed=0, h=16, w=12):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, h, w, generator=g), torch.tensor([981.0, 250.5]),
            torch.randn(2, 7, 24, generator=g), torch.randn(2, 12, generator=g))


def test_outputs_match_diffusers(models):
    name, theirs, ours, _ = models
    for h, w in ((16, 12), (8, 24)):      # non-square, and a grid wider than the base size
        x, t, c, pooled = inputs(h=h, w=w)
        with torch.no_grad():
            want = theirs(x, c, pooled, t).sample
            got = ours(x, t, c, pooled)
        assert got.shape == want.shape == x.shape
        d = maxdiff(got, want)
        assert d < 1e-5, f"{name} {h}x{w}: {d}"
        assert want.abs().mean() > 0.1          # the comparison has teeth: a real signal


def test_bf16_matches_diffusers(models):
    """In bf16 (weights loaded and cast by weights.sd3) the outputs follow diffusers' bf16 model: measured
    bitwise equal on CPU; the bound is one bf16 rounding of values around 1."""
    name, theirs, _, folder = models
    ours = load_mmdit(folder, dtype=torch.bfloat16)
    theirs = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    x, t, c, pooled = (v.to(torch.bfloat16) if v.is_floating_point() and v.dim() > 1 else v for v in inputs())
    with torch.no_grad():
        want, got = theirs(x, c, pooled, t).sample, ours(x, t, c, pooled)
    assert got.dtype == want.dtype == torch.bfloat16
    assert maxdiff(got.float(), want.float()) <= 1e-2, name


def test_structure(models):
    name, theirs, ours, _ = models
    assert set(ours.state_dict()) == set(theirs.state_dict())
    blocks = ours.transformer_blocks
    assert blocks[-1].context_pre_only and blocks[-1].ff_context is None and blocks[-1].attn.to_add_out is None
    assert (blocks[0].attn2 is not None) == (name == "sd3.5") and blocks[2].attn2 is None
    assert (blocks[0].attn.norm_added_q is not None) == (name == "sd3.5")
    # Our own positional table (built, not loaded) equals the one diffusers stores.
    fresh = build(ours.config)
    assert maxdiff(fresh.pos_embed.pos_embed, theirs.pos_embed.pos_embed) < 1e-6


def test_inputs_reach_the_output(models):
    """Each input changes the output: timestep, pooled vector, text states, and the image tokens."""
    _, _, ours, _ = models
    x, t, c, pooled = inputs()
    with torch.no_grad():
        base = ours(x, t, c, pooled)
        for changed in (ours(x, t + 100, c, pooled), ours(x, t, c, pooled + 1), ours(x, t, c + 1, pooled)):
            assert maxdiff(changed, base) > 1e-3


def test_mid_features_and_checkpointing(models):
    _, _, ours, _ = models
    x, t, c, pooled = inputs()
    out, mid = ours(x, t, c, pooled, return_mid=True)
    assert mid.shape == (2, ours.config.inner_dim, 8, 6)
    x.requires_grad_(True)
    ours.enable_gradient_checkpointing(True)
    try:
        out_ckpt = ours(x, t, c, pooled)
        (g_ckpt,) = torch.autograd.grad(out_ckpt.square().mean(), x)
    finally:
        ours.enable_gradient_checkpointing(False)
    (g,) = torch.autograd.grad(ours(x, t, c, pooled).square().mean(), x)
    assert maxdiff(out_ckpt, out) == 0 and maxdiff(g_ckpt, g) < 1e-7


def test_triton_kernels_path(models):
    """The same model with every op on the Triton kernels (interpreted on CPU: attention, the modulated
    LayerNorm with strided per-sample shift/scale, the per-head RMS norm on (B, H, L, D)): outputs and
    input gradients agree with the PyTorch path."""
    import kernels
    _, _, ours, _ = models
    x, t, c, pooled = inputs(h=8, w=6)
    x.requires_grad_(True)
    out = ours(x, t, c, pooled)
    (g,) = torch.autograd.grad(out.square().mean(), x)
    with kernels.force_triton():
        out_t = ours(x, t, c, pooled)
        (g_t,) = torch.autograd.grad(out_t.square().mean(), x)
    assert maxdiff(out_t, out) < 1e-4 and maxdiff(g_t, g) < 1e-5


@pytest.mark.parametrize("name", list(RELEASED))
def test_full_size_configs_on_meta(name):
    """diffusers' model from the released config vs ours from the preset and from the same config dict."""
    config = {**COMMON, **RELEASED[name]}
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**config)
    want = {k: v.shape for k, v in theirs.state_dict().items()}
    for ours in (build(name, device="meta"), build(SD3Config.from_config_json(config), device="meta")):
        got = {k: v.shape for k, v in ours.state_dict().items()}
        assert got == want
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert CONFIGS[name] == SD3Config.from_config_json({"_class_name": "SD3Transformer2DModel", **config})


@pytest.mark.parametrize("field, value", [("qk_norm", "layer_norm"), ("pos_embed_max_size", None),
                                          ("caption_projection_dim", 20), ("dual_attention_layers", [5]),
                                          ("_class_name", "FluxTransformer2DModel")])
def test_unsupported_config_values_are_named(models, tmp_path, field, value):
    _, _, _, folder = models
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=field):
        load_mmdit(tmp_path)


def test_key_errors_are_named(models, tmp_path):
    """A missing key, an extra key and a wrong shape each give a one-line error naming the key."""
    from safetensors.torch import load_file, save_file
    _, _, _, folder = models
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    cases = {"context_embedder.bias": lambda s: s.pop("context_embedder.bias"),
             "transformer_blocks.9.ff.net.2.bias": lambda s: s.update({"transformer_blocks.9.ff.net.2.bias":
                                                                       torch.zeros(16)}),
             "proj_out.weight": lambda s: s.update({"proj_out.weight": torch.zeros(3, 16)})}
    for key, edit in cases.items():
        broken = dict(state)
        edit(broken)
        save_file(broken, file)
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as e:
            load_mmdit(tmp_path)
        assert "\n" not in str(e.value)


def test_token_grid_larger_than_the_table_is_refused(models):
    _, _, ours, _ = models
    x, t, c, pooled = inputs(h=26, w=12)       # 13 tokens high > pos_embed_max_size 12
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(x, t, c, pooled)


# ----------------------------------------------------------------------------- single files (original layout)

BLOCK_RENAMES = {  # diffusers name in a block -> Stability's, written here independently of weights/sd3.py
    "attn.to_out.0": "x_block.attn.proj", "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "attn.to_add_out": "context_block.attn.proj", "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k", "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2"}
FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}


def to_original(state, num_layers):
    """diffusers keys -> the sd3 reference layout under model.diffusion_model.: fused qkv, and the two
    adaLN-Continuous projections (last block's context, final layer) as (shift, scale)."""
    def swap(t):
        scale, shift = t.chunk(2)
        return torch.cat([shift, scale])
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for kind in ("weight", "bias"):
        for ours, theirs in TOP.items():
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap(state[f"norm_out.linear.{kind}"])
        for i in range(num_layers):
            b = f"transformer_blocks.{i}."
            for fused, parts in FUSED.items():
                if b + parts[0] + "." + kind in state:
                    out[f"joint_blocks.{i}.{fused}.{kind}"] = torch.cat([state[b + p + "." + kind] for p in parts])
            for ours, theirs in BLOCK_RENAMES.items():
                if b + ours + "." + kind in state:
                    t = state[b + ours + "." + kind]
                    out[f"joint_blocks.{i}.{theirs}.{kind}"] = swap(t) if ours == "norm1_context.linear" and \
                        i == num_layers - 1 else t
    return {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}


def test_single_file_converts_back_exactly(models, tmp_path):
    """Our inverse of the key rules gives the layout diffusers' own single-file converter reads back to the
    same tensors; weights.sd3 reads it back to the same state dict, config and outputs."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file
    name, theirs, ours, _ = models
    state = theirs.state_dict()
    original = to_original(state, TINY["num_layers"])
    assert len(original) < len(state)                      # the fused qkv
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    file = tmp_path / "sd3_tiny.safetensors"
    extra = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4),
             "first_stage_model.decoder.conv_in.bias": torch.zeros(4)}   # a whole-pipeline file's other parts
    save_file({**original, **extra}, file)
    loaded = load_mmdit(file, config=None if name == "sd3.5" else {**TINY, "attention_head_dim": 8})
    # sample_size cannot be read from shapes (it only sets the base of the stored table): SD3's 128.
    assert loaded.config == replace(ours.config, sample_size=loaded.config.sample_size)
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
    x, t, c, pooled = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c, pooled), ours(x, t, c, pooled))

    # A file without the fixed positional table gets it recomputed; a missing projection is named.
    save_file({k: v for k, v in original.items() if k != "model.diffusion_model.pos_embed"}, file)
    assert maxdiff(load_mmdit(file, config=ours.config).pos_embed.pos_embed, state["pos_embed.pos_embed"]) < 1e-6
    save_file({k: v for k, v in original.items() if "joint_blocks.1.context_block.attn.qkv" not in k}, file)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.attn\.add_q_proj"):
        load_mmdit(file, config=ours.config)


def test_whole_pipeline_single_file_is_refused_in_one_line(models, tmp_path):
    import weights
    from safetensors.torch import save_file
    _, theirs, _, _ = models
    file = tmp_path / "sd3_tiny.safetensors"
    save_file(to_original(theirs.state_dict(), TINY["num_layers"]), file)
    with pytest.raises(CheckpointError, match="SD3 / SD3.5 single file") as e:
        weights.load_pipeline(file)
    assert "\n" not in str(e.value)
