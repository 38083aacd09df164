"""PixArt-alpha transformer (flash/dit.py, weights/pixart.py) against diffusers' PixArtTransformer2DModel.

Tiny random configs are saved with diffusers' save_pretrained and loaded by our loader; fp32 outputs and
the middle-block features must agree to 1e-5. The full-size configs are compared on the meta device only.
"""
import pytest
import torch
from diffusers import PixArtTransformer2DModel as RefModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import save_file

from flash.dit import CONFIGS, PixArtConfig, additional_conditions, build, sincos_pos_embed_2d
from weights import load_transformer
from flash.io import CheckpointError
from weights.pixart import config_from_original, convert_original

TOL = 1e-5
CAPTION_CHANNELS, CAPTION_LEN = 16, 7
TINY = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=4,
            cross_attention_dim=24, caption_channels=CAPTION_CHANNELS, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True)
VARIANTS = {
    # like the 1024-MS model: size conditions on, explicit interpolation scale 2
    "ms": dict(TINY, sample_size=16, use_additional_conditions=True, interpolation_scale=2),
    # like the 512 model: both left to diffusers' defaults (off, max(8 // 64, 1) = 1)
    "plain": dict(TINY, sample_size=8),
}
OTHER_SIZE = {"ms": (12, 20), "plain": (10, 6)}  # latent sizes != sample_size, non-square

# The released transformer/config.json of PixArt-alpha/PixArt-XL-2-1024-MS (the 512 one differs by sample_size 64).
RELEASED_1024_MS = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096,
    "cross_attention_dim": 1152, "double_self_attention": False, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128,
    "upcast_attention": False, "use_linear_projection": False,
}
LEGACY_KEYS = ("_class_name", "_diffusers_version", "double_self_attention", "num_vector_embeds",
               "only_cross_attention", "use_linear_projection")


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(variant name, diffusers model, our model loaded from diffusers' save_pretrained folder)."""
    torch.manual_seed(0)
    ref = RefModel(**VARIANTS[request.param]).eval()
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    ref.save_pretrained(folder)
    return request.param, ref, load_transformer(folder)


def inputs(name, size, lengths=(7, 3, 1)):
    """A batch of captions padded to CAPTION_LEN with junk past each one's length."""
    g = torch.Generator().manual_seed(1)
    b = len(lengths)
    x = torch.randn(b, 4, *size, generator=g)
    t = torch.tensor([999, 10, 500][:b])
    context = torch.randn(b, CAPTION_LEN, CAPTION_CHANNELS, generator=g)
    mask = (torch.arange(CAPTION_LEN)[None] < torch.tensor(lengths)[:, None]).long()  # like a tokenizer's
    sized = VARIANTS[name].get("use_additional_conditions")
    added = additional_conditions(size[0] * 8, size[1] * 8, b) if sized else None  # pixel sizes, VAE factor 8
    return x, t, context, mask, added


def run_ref(ref, x, t, context, mask, added, mid_index):
    store = []
    hook = ref.transformer_blocks[mid_index].register_forward_hook(lambda m, args, out: store.append(out))
    with torch.no_grad():
        out = ref(x, encoder_hidden_states=context, timestep=t, added_cond_kwargs=added,
                  encoder_attention_mask=mask, return_dict=False)[0]
    hook.remove()
    b, _, h, w = x.shape
    p = ref.config.patch_size
    return out, store[0].transpose(1, 2).reshape(b, -1, h // p, w // p)


@pytest.mark.parametrize("size", ["native", "other"])
def test_parity_with_padded_captions(pair, size):
    name, ref, ours = pair
    side = VARIANTS[name]["sample_size"]
    x, t, context, mask, added = inputs(name, (side, side) if size == "native" else OTHER_SIZE[name])
    assert ours.mid_block_index == 1  # 4 blocks: the first half ends at index 1
    want, want_mid = run_ref(ref, x, t, context, mask, added, ours.mid_block_index)
    with torch.no_grad():
        got, got_mid = ours(x, t, context, context_mask=mask, added_cond=added, return_mid=True)
    assert got.shape == want.shape == (3, 8, *x.shape[-2:])
    assert got_mid.shape == (3, 24, x.shape[-2] // 2, x.shape[-1] // 2)
    assert (got - want).abs().max() <= TOL
    assert (got_mid - want_mid).abs().max() <= TOL
    # The mask matters: without it the padded junk changes the answer.
    with torch.no_grad():
        unmasked = ours(x, t, context, added_cond=added)
    assert (unmasked - want).abs().max() > 1e-3


def test_all_padding_caption_attends_to_everything(pair):
    """Upstream adds a -10000 bias to padded keys, so a caption with no real token attends to all of them
    (we do that exactly instead of returning NaN). Its fp32 sum s - 10000 rounds the logits (ulp ~1e-3
    at 1e4), hence the looser tolerance against diffusers for that row only."""
    name, ref, ours = pair
    x, t, context, mask, added = inputs(name, OTHER_SIZE[name], lengths=(2, 0))
    want, _ = run_ref(ref, x, t, context, mask, added, ours.mid_block_index)
    with torch.no_grad():
        got = ours(x, t, context, mask, added)
        unmasked = ours(x, t, context, None, added)
    assert (got[0] - want[0]).abs().max() <= TOL
    assert (got[1] - unmasked[1]).abs().max() <= 1e-6
    assert (got[1] - want[1]).abs().max() <= 1e-4


def test_parity_without_mask(pair):
    name, ref, ours = pair
    x, t, context, _, added = inputs(name, OTHER_SIZE[name], lengths=(7, 7))
    want, _ = run_ref(ref, x, t, context, None, added, ours.mid_block_index)
    with torch.no_grad():
        got = ours(x, t, context, added_cond=added)
    assert (got - want).abs().max() <= TOL


def test_additional_conditions_are_used(pair):
    name, ref, ours = pair
    if name == "plain":  # no size embedders, as in diffusers (their keys are compared in the meta test)
        assert not hasattr(ours.adaln_single.emb, "resolution_embedder")
        return
    x, t, context, mask, added = inputs(name, (16, 16))
    with pytest.raises(ValueError, match="added_cond"):
        ours(x, t, context, context_mask=mask)
    other = additional_conditions(512, 1024, 3)
    want, _ = run_ref(ref, x, t, context, mask, other, 1)
    with torch.no_grad():
        got, base = (ours(x, t, context, context_mask=mask, added_cond=a) for a in (other, added))
    assert (got - want).abs().max() <= TOL
    assert (got - base).abs().max() > 1e-4


def test_pos_embed_equals_diffusers():
    for (h, w), base, scale in [((8, 8), 8, 1), ((6, 10), 8, 2), ((5, 3), 4, 0.5)]:
        want = get_2d_sincos_pos_embed(24, (h, w), base_size=base, interpolation_scale=scale, output_type="pt").float()
        assert torch.equal(sincos_pos_embed_2d(24, h, w, base, scale), want)


# Diffusers -> original layout, written independently of ORIGINAL_RULES (prefix renames, then fusions).
TO_ORIGINAL = [
    ("pos_embed.proj.", "x_embedder.proj."), ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    ("adaln_single.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("adaln_single.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("adaln_single.emb.resolution_embedder.linear_1.", "csize_embedder.mlp.0."),
    ("adaln_single.emb.resolution_embedder.linear_2.", "csize_embedder.mlp.2."),
    ("adaln_single.emb.aspect_ratio_embedder.linear_1.", "ar_embedder.mlp.0."),
    ("adaln_single.emb.aspect_ratio_embedder.linear_2.", "ar_embedder.mlp.2."),
    ("adaln_single.linear.", "t_block.1."), ("proj_out.", "final_layer.linear."),
    ("scale_shift_table", "final_layer.scale_shift_table"),
]
BLOCK_TO_ORIGINAL = [("attn1.to_out.0.", "attn.proj."), ("attn2.to_q.", "cross_attn.q_linear."),
                     ("attn2.to_out.0.", "cross_attn.proj."), ("ff.net.0.proj.", "mlp.fc1."), ("ff.net.2.", "mlp.fc2."),
                     ("scale_shift_table", "scale_shift_table")]


def to_original(sd, num_layers):
    out = {}
    for new, old in TO_ORIGINAL:
        out.update({old + k[len(new):]: v for k, v in sd.items() if k.startswith(new)})
    for i in range(num_layers):
        pre = f"transformer_blocks.{i}."
        blk = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        for new, old in BLOCK_TO_ORIGINAL:
            out.update({f"blocks.{i}.{old}{k[len(new):]}": v for k, v in blk.items() if k.startswith(new)})
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([blk[f"attn1.to_{n}.{s}"] for n in "qkv"])
            out[f"blocks.{i}.cross_attn.kv_linear.{s}"] = torch.cat([blk[f"attn2.to_{n}.{s}"] for n in "kv"])
    assert len(out) == len(sd) - 6 * num_layers  # q,k,v -> qkv (-2) and k,v -> kv_linear (-1), weight and bias
    return out


def test_original_layout_loads_exactly(pair, tmp_path):
    name, _, ours = pair
    cfg = ours.config
    original = to_original(ours.state_dict(), cfg.num_layers)
    original["pos_embed"] = sincos_pos_embed_2d(24, 8, 8, 8, 1)[None]  # present in the original files, dropped
    original["y_embedder.y_embedding"] = torch.randn(CAPTION_LEN, CAPTION_CHANNELS)
    save_file(original, tmp_path / "pixart.safetensors")
    loaded = load_transformer(tmp_path / "pixart.safetensors", config=cfg)
    want, got = ours.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x, t, context, mask, added = inputs(name, OTHER_SIZE[name])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context, mask, added), ours(x, t, context, mask, added))
    # A wrong config is a one-line CheckpointError naming the file, not a traceback from load_state_dict.
    with pytest.raises(CheckpointError, match="pixart.safetensors"):
        load_transformer(tmp_path / "pixart.safetensors", config="pixart-xl-2-512")


def test_pipeline_folder_and_fp16_variant(tmp_path):
    torch.manual_seed(0)
    ref = RefModel(**VARIANTS["plain"]).half()
    ref.save_pretrained(tmp_path / "transformer", variant="fp16")
    ours = load_transformer(tmp_path, variant="fp16", dtype=None)  # a pipeline root: finds transformer/
    want, got = ref.state_dict(), ours.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert got["proj_out.weight"].dtype == torch.float16


def ref_meta(config):
    with torch.device("meta"):
        return RefModel(**{k: v for k, v in config.items() if k not in LEGACY_KEYS})


@pytest.mark.parametrize("preset, sample_size", [("pixart-xl-2-1024-ms", 128), ("pixart-xl-2-512", 64)])
def test_full_size_matches_diffusers_on_meta(preset, sample_size):
    released = dict(RELEASED_1024_MS, sample_size=sample_size)
    assert PixArtConfig.from_config_json(released) == CONFIGS[preset]
    ref, ours = ref_meta(released), build(preset, device="meta")
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == {"pixart-xl-2-1024-ms": 611_349_152, "pixart-xl-2-512": 610_856_096}[preset]
    assert ours.mid_block_index == 13
    # The rules cover the full-size original layout key for key (meta tensors: no memory).
    original = to_original(ours.state_dict(), 28)
    original["pos_embed"] = torch.empty(1, (sample_size // 2) ** 2, 1152, device="meta")
    assert {k: tuple(v.shape) for k, v in convert_original(original).items()} == want
    assert config_from_original(original) == CONFIGS[preset]


def test_config_errors():
    with pytest.raises(ValueError, match="norm_type"):
        PixArtConfig.from_config_json(dict(RELEASED_1024_MS, norm_type="layer_norm"))
    with pytest.raises(ValueError, match="_class_name"):
        PixArtConfig.from_config_json({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(CheckpointError, match="pickle"):
        load_transformer("PixArt-XL-2-1024-MS.pth")
    with pytest.raises(ValueError, match="multiple of 3"):
        PixArtConfig(num_attention_heads=1, attention_head_dim=8, use_additional_conditions=True)
