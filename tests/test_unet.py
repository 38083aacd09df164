"""Parity of flash.unet with diffusers' UNet2DConditionModel (the oracle) on tiny random configs saved with
`save_pretrained` and read back by weights.load_unet; the full-size released configs are checked on the meta
device (parameter counts and key sets equal diffusers')."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet

import weights
from flash.io import CheckpointError
from flash.unet import CONFIGS, UNet2DConditionModel, UNetConfig
from helpers import maxdiff, randomize

TOL = 1e-5
CTX = 24  # tiny cross_attention_dim

TINY = {
    # SD1.5-like: conv proj_in/out, attention in the first levels, one int for the heads.
    "sd15": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=2, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=CTX, sample_size=16),
    # SD2-like: linear projections, a per-level heads list (that diffusers calls attention_head_dim), upcast.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4), norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=CTX, use_linear_projection=True, upcast_attention=True, sample_size=16),
    # SDXL-like: text_time micro-conditioning, no attention in the first level, transformer depth per level.
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(1, 2, 4), norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), cross_attention_dim=CTX, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=20 + 6 * 8, sample_size=16),
}
TINY["inpaint"] = dict(TINY["sd15"], in_channels=9)   # noisy latent 4 + mask 1 + masked-image latent 4
POOLED = 20  # tiny "text_embeds" width of the SDXL-like config


def make_ref(name, tmp_path, **save_kw):
    ref = randomize(RefUNet(**TINY[name])).eval()
    ref.save_pretrained(tmp_path, **save_kw)
    return ref


def inputs(name, h, w, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY[name].get("in_channels", 4), h, w, generator=g)
    ctx = torch.randn(batch, 7, CTX, generator=g)
    added = None
    if name == "sdxl":
        ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]]).repeat(batch, 1)
        added = {"text_embeds": torch.randn(batch, POOLED, generator=g), "time_ids": ids}
    return x, ctx, added


def run_ref(ref, x, t, ctx, added):
    """diffusers' prediction and its mid-block output (captured with a forward hook)."""
    seen = {}
    hook = ref.mid_block.register_forward_hook(lambda m, a, out: seen.setdefault("mid", out))
    try:
        with torch.no_grad():
            pred = ref(x, t, ctx, added_cond_kwargs=added).sample
    finally:
        hook.remove()
    return pred, seen["mid"]


@pytest.mark.parametrize("name", list(TINY))
def test_parity(tmp_path, name):
    ref = make_ref(name, tmp_path)
    ours = weights.load_unet(tmp_path)
    assert isinstance(ours, UNet2DConditionModel) and not ours.training
    # Square, non-square, and a size that is not a multiple of 4 (the up path must resize to the skips).
    for (h, w), t in (((16, 16), torch.tensor([10, 980])), ((16, 24), 500), ((10, 14), torch.tensor(3.5))):
        x, ctx, added = inputs(name, h, w)
        want, want_mid = run_ref(ref, x, t, ctx, added)
        with torch.no_grad():
            got, mid = ours(x, t, ctx, added_cond=added, return_mid=True)
        assert got.shape == want.shape == (2, 4, h, w)
        assert mid.shape == want_mid.shape
        assert maxdiff(got, want) <= TOL, (name, h, w, maxdiff(got, want))
        assert maxdiff(mid, want_mid) <= TOL, (name, h, w, maxdiff(mid, want_mid))
        assert want.abs().max() > 0.1     # the comparison is not between two near-zero outputs


def test_wrong_weight_is_detected(tmp_path):
    # The parity tolerance is meaningful: one perturbed cross-attention weight breaks it.
    ref = make_ref("sd15", tmp_path)
    ours = weights.load_unet(tmp_path)
    with torch.no_grad():
        ours.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.add_(0.01)
    x, ctx, _ = inputs("sd15", 16, 16)
    want, _ = run_ref(ref, x, 5, ctx, None)
    with torch.no_grad():
        assert maxdiff(ours(x, 5, ctx), want) > 1e-4


def test_sharded_fp16_variant(tmp_path):
    # A sharded fp16-variant folder loads, cast to fp32, and matches diffusers reading the same files.
    ref = make_ref("sdxl", tmp_path)
    ref.half().save_pretrained(tmp_path / "v", variant="fp16", max_shard_size="300KB")
    assert (tmp_path / "v" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list((tmp_path / "v").glob("*.safetensors"))) > 1
    ours = weights.load_unet(tmp_path / "v", variant="fp16")
    assert ours.conv_in.weight.dtype == torch.float32
    back = RefUNet.from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float32).eval()
    x, ctx, added = inputs("sdxl", 16, 16)
    want, _ = run_ref(back, x, 7, ctx, added)
    with torch.no_grad():
        assert maxdiff(ours(x, 7, ctx, added_cond=added), want) <= TOL
    half = weights.load_unet(tmp_path / "v", dtype=None)
    assert half.conv_in.weight.dtype == torch.float16


def test_gradient_checkpointing_same_grads(tmp_path):
    make_ref("sdxl", tmp_path)
    ours = weights.load_unet(tmp_path).train()
    x, ctx, added = inputs("sdxl", 8, 8, batch=1)
    grads = []
    for on in (False, True):
        ours.zero_grad()
        ours.enable_gradient_checkpointing(on)
        out = ours(x, 100, ctx, added_cond=added)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert grads[0].abs().max() > 0
    assert maxdiff(grads[0], grads[1]) <= 1e-6


def test_sdxl_needs_added_cond(tmp_path):
    make_ref("sdxl", tmp_path)
    ours = weights.load_unet(tmp_path)
    x, ctx, _ = inputs("sdxl", 8, 8)
    with pytest.raises(ValueError, match="text_embeds"):
        ours(x, 1, ctx)


def test_config_json(tmp_path):
    raw = dict(SD15, _class_name="UNet2DConditionModel", some_future_key=1)
    assert UNetConfig.from_config_json(raw) == CONFIGS["sd15"]          # unknown keys ignored
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_config_json(dict(SD15, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="down_block_types"):
        UNetConfig.from_config_json(dict(SD15, down_block_types=["SimpleCrossAttnDownBlock2D"] * 4))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.from_config_json(dict(SD15, attention_head_dim=[8, 8]))
    (tmp_path / "config.json").write_text(json.dumps(dict(SD15, time_embedding_type="fourier")))
    with pytest.raises(CheckpointError, match=r"config\.json.*time_embedding_type"):
        weights.load_unet(tmp_path)


# ---- Full size, on the meta device: structure must equal diffusers' built from the released configs ----

_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
# runwayml/stable-diffusion-v1-5 unet/config.json
SD15 = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": _SD_DOWN,
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "up_block_types": _SD_UP}
# stabilityai/stable-diffusion-2-1 unet/config.json
SD2 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
           num_class_embeds=None, only_cross_attention=False, sample_size=96, use_linear_projection=True,
           upcast_attention=True)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL = {"act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
        "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True}
# runwayml/stable-diffusion-inpainting unet/config.json
SD15_INPAINT = dict(SD15, in_channels=9)

FULL = {"sd15": (SD15, 859_520_964), "sd2": (SD2, None), "sdxl": (SDXL, 2_567_463_684),
        "sd15-inpaint": (SD15_INPAINT, None)}


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_structure_on_meta(name):
    raw, count = FULL[name]
    with torch.device("meta"):
        ref = RefUNet.from_config(raw)
        ours = UNet2DConditionModel(UNetConfig.from_config_json(raw))
        preset = UNet2DConditionModel(CONFIGS[name])
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for model in (ours, preset):
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
        assert got == want
        n = sum(p.numel() for p in model.parameters())
        assert n == sum(p.numel() for p in ref.parameters())
        if count is not None:
            assert n == count
