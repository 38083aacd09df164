"""flash/lora.py: adapter mechanics, and the diffusers / PEFT / kohya formats against the real libraries.

Oracles: PEFT (on a small generic module: Linear, 3x3 and 1x1 Conv2d) and diffusers' UNet LoRA loading
(`lora_state_dict` + `load_lora_into_unet`, what `load_lora_weights` runs) on a tiny random UNet; then
the same files in flash's own UNet. peft is a test-only dependency (requirements-dev.txt).
"""
import copy
import json

import pytest
import torch
import torch.nn as nn
from diffusers import StableDiffusionPipeline, UNet2DConditionModel as RefUNet
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import weights
from flash import lora as L
from flash.io import CheckpointError, read_safetensors, write_safetensors
from helpers import maxdiff

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, norm_num_groups=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2)
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


class Small(nn.Module):
    """A generic module with the layer kinds LoRA targets (names as in the UNet's attention)."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(6, 8, bias=False)
        self.attn.to_out = nn.ModuleList([nn.Linear(8, 6), nn.Dropout(0.0)])

    def forward(self, x):                                   # (B, 3, H, W) -> (B, 6, H, W)
        h = self.conv(self.proj_in(x))
        t = h.flatten(2).transpose(1, 2)
        t = self.attn.to_out[0](torch.tanh(self.attn.to_q(t)))
        return h + t.transpose(1, 2).reshape(h.shape)


SMALL_TARGETS = ["proj_in", "conv", "to_q", "to_out.0"]


def randomize_lora(model, seed=0):
    """Fresh adapters have B = 0 (no effect): give every lora_B random values so outputs move."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture
def small():
    return Small().eval()


@pytest.fixture
def xs():
    return torch.randn(2, 3, 5, 5)


# ---------------------------------------------------------------------------------------------------
# Mechanics


def test_inject_keeps_base_keys_and_changes_nothing(small, xs):
    base_sd = {k: v.clone() for k, v in small.state_dict().items()}
    base_out = small(xs)
    names = L.inject_lora(small, rank=4, alpha=8, targets=SMALL_TARGETS)
    assert names == ["proj_in", "conv", "attn.to_q", "attn.to_out.0"]
    assert isinstance(small.attn.to_q, nn.Linear) and isinstance(small.conv, nn.Conv2d)
    sd = small.state_dict()
    lora_keys = {k for k in sd if ".lora_" in k}
    assert set(sd) - lora_keys == set(base_sd)                        # to_q.weight is still the base key
    assert "attn.to_out.0.lora_A.weight" in lora_keys and "conv.lora_B.weight" in lora_keys
    assert small.conv.lora_A.weight.shape == (4, 6, 3, 3) and small.conv.lora_B.weight.shape == (6, 4, 1, 1)
    result = small.load_state_dict(base_sd, strict=False)             # base checkpoints still load
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys
    assert torch.equal(small(xs), base_out)                           # B = 0: no change yet
    with pytest.raises(ValueError, match="already has a LoRA"):
        L.inject_lora(small, rank=4, targets=["conv"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        L.inject_lora(Small(), rank=4, targets=["nope"])


def test_gaussian_init_and_trainable_params():
    lin = nn.Module()
    lin.to_q = nn.Linear(512, 512)
    L.inject_lora(lin, rank=16, targets=["to_q"])
    assert abs(lin.to_q.lora_A.weight.std().item() - 1 / 16) < 0.003   # A ~ N(0, 1/r^2)
    assert torch.count_nonzero(lin.to_q.lora_B.weight) == 0
    L.mark_only_lora_trainable(lin)
    trainable = [n for n, p in lin.named_parameters() if p.requires_grad]
    assert trainable == ["to_q.lora_A.weight", "to_q.lora_B.weight"]
    assert L.count_lora_params(lin) == 2 * 16 * 512
    lin.to_q(torch.randn(3, 512)).sum().backward()
    assert lin.to_q.weight.grad is None and lin.to_q.lora_B.weight.grad.abs().sum() > 0


def test_disable_scale_fuse_unfuse(small, xs):
    base_out = small(xs)
    base_w = {k: v.clone() for k, v in small.state_dict().items()}
    L.inject_lora(small, rank=4, alpha=8, targets=SMALL_TARGETS)
    randomize_lora(small)
    lora_out = small(xs)
    assert maxdiff(lora_out, base_out) > 0.1
    with L.lora_disabled(small):                      # the teacher: exactly the base model
        assert torch.equal(small(xs), base_out)
    assert torch.equal(small(xs), lora_out)
    L.set_lora_scale(small, 0.0)
    assert torch.equal(small(xs), base_out)
    L.set_lora_scale(small, 1.0)
    L.fuse_lora(small)
    assert maxdiff(small(xs), lora_out) < 1e-5
    assert maxdiff(small.conv.weight, base_w["conv.weight"]) > 1e-3
    with pytest.raises(ValueError, match="fused"):
        L.set_lora_enabled(small, False)
    L.unfuse_lora(small)
    for k, v in base_w.items():
        assert maxdiff(small.state_dict()[k], v) < 1e-6, k
    assert maxdiff(small(xs), lora_out) < 1e-6


def test_linear_scale_of_the_update():
    m = nn.Module()
    m.to_q = nn.Linear(6, 5)
    L.inject_lora(m, rank=2, alpha=6, targets=["to_q"])
    randomize_lora(m)
    x = torch.randn(4, 6)
    A, B = m.to_q.lora_A.weight, m.to_q.lora_B.weight
    want = x @ m.to_q.weight.T + m.to_q.bias + 3.0 * 0.5 * (x @ A.T @ B.T)     # alpha / r = 3, scale .5
    L.set_lora_scale(m, 0.5)
    torch.testing.assert_close(m.to_q(x), want)


def test_meta_device_inject_and_sd15_sdxl_counts():
    """docs/method.md, "LoRA": SD1.5 rank 128 on to_q/k/v/out.0 = 25,509,888; SDXL rank 64 = 92,897,280."""
    from flash.unet import CONFIGS, UNet2DConditionModel
    for name, rank, want in (("sd15", 128, 25_509_888), ("sdxl", 64, 92_897_280)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(CONFIGS[name])
        names = L.inject_lora(unet, rank=rank)
        assert L.count_lora_params(unet) == want, name
        assert len(names) == {"sd15": 128, "sdxl": 560}[name]
        assert unet.get_submodule(names[0]).lora_A.weight.is_meta


# ---------------------------------------------------------------------------------------------------
# PEFT on a generic module


def peft_model(seed=0):
    torch.manual_seed(seed)
    base = Small().eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=SMALL_TARGETS, init_lora_weights="gaussian",
                     rank_pattern={"conv": 2}, alpha_pattern={"to_q": 3})
    return base, randomize_lora(get_peft_model(copy.deepcopy(base), cfg)).eval()


def test_peft_folder_loads_and_our_export_loads_into_peft(tmp_path, xs):
    base, pm = peft_model()
    pm.save_pretrained(tmp_path / "peft")
    want = pm(xs)
    ours = copy.deepcopy(base)
    names = L.load_lora(ours, tmp_path / "peft")
    assert names == ["attn.to_out.0", "attn.to_q", "conv", "proj_in"]
    assert ours.conv.rank == 2 and ours.attn.to_q.alpha == 3 and ours.proj_in.alpha == 8
    assert maxdiff(ours(xs), want) < 1e-6
    # our PEFT export -> PeftModel.from_pretrained
    L.save_lora(ours, tmp_path / "ours", format="peft")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {"conv": 2}
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert maxdiff(back(xs), want) < 1e-6


def test_rslora_config(tmp_path, xs):
    torch.manual_seed(0)
    base = Small().eval()
    pm = randomize_lora(get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "conv"], use_rslora=True))).eval()
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    L.load_lora(ours, tmp_path)
    assert maxdiff(ours(xs), pm(xs)) < 1e-6


# ---------------------------------------------------------------------------------------------------
# diffusers on a tiny UNet, and flash's own UNet


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    ref = RefUNet(**TINY_UNET).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ref


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 12, generator=g)


def diffusers_save(unet, folder, rank=4, alpha=8, metadata=True):
    """A LoRA trained the diffusers way: PEFT adapter on the UNet, saved by save_lora_weights."""
    pm = copy.deepcopy(unet)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTN, init_lora_weights="gaussian")
    pm.add_adapter(cfg)
    randomize_lora(pm, seed=3)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pm),
                                              unet_lora_adapter_metadata=cfg.to_dict() if metadata else None)
    return pm


def diffusers_load(unet, path):
    """What pipe.load_lora_weights(path) does for the UNet."""
    model = copy.deepcopy(unet)
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, network_alphas=alphas, unet=model, metadata=meta)
    return model


def run(unet, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return unet(x, t, c).sample if isinstance(unet, RefUNet) or hasattr(unet, "peft_config") else unet(x, t, c)


@pytest.mark.parametrize("metadata", [True, False])
def test_diffusers_lora_loads_like_load_lora_weights(tmp_path, tiny_unet, unet_inputs, metadata):
    diffusers_save(tiny_unet, tmp_path, metadata=metadata)
    want = run(diffusers_load(tiny_unet, tmp_path), unet_inputs)
    assert maxdiff(want, run(tiny_unet, unet_inputs)) > 1e-2          # the LoRA does something
    ours = copy.deepcopy(tiny_unet)
    names = L.load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
    assert len(names) == 32            # 4 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert maxdiff(run(ours, unet_inputs), want) < 1e-5
    if not metadata:
        return
    # the same file in flash's UNet, read from a diffusers folder by weights.load_unet
    tiny_unet.save_pretrained(tmp_path / "unet")
    flash_unet = weights.load_unet(tmp_path / "unet")
    L.load_lora(flash_unet, tmp_path)
    assert maxdiff(run(flash_unet, unet_inputs), want) < 1e-5
    with L.lora_disabled(flash_unet):
        assert maxdiff(run(flash_unet, unet_inputs), run(tiny_unet, unet_inputs)) < 1e-5


def test_our_exports_load_into_diffusers_and_round_trip(tmp_path, tiny_unet, unet_inputs):
    tiny_unet.save_pretrained(tmp_path / "unet")
    ours = weights.load_unet(tmp_path / "unet")
    L.inject_lora(ours, rank=4, alpha=2)                      # alpha != rank: folded into B on export
    randomize_lora(ours, seed=5)
    want = run(ours, unet_inputs)
    L.save_lora(ours, tmp_path / "d.safetensors", format="diffusers")
    assert maxdiff(run(diffusers_load(tiny_unet, tmp_path / "d.safetensors"), unet_inputs), want) < 1e-5
    L.save_lora(ours, tmp_path / "k.safetensors", format="kohya")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in \
        read_safetensors(tmp_path / "k.safetensors")
    assert maxdiff(run(diffusers_load(tiny_unet, tmp_path / "k.safetensors"), unet_inputs), want) < 1e-5
    # diffusers -> PEFT -> kohya -> diffusers, each loaded into a fresh flash UNet
    path = tmp_path / "d.safetensors"
    for fmt, dest in (("peft", tmp_path / "p"), ("kohya", tmp_path / "k2.safetensors"),
                      ("diffusers", tmp_path / "d2.safetensors")):
        model = weights.load_unet(tmp_path / "unet")
        L.load_lora(model, path)
        assert maxdiff(run(model, unet_inputs), want) < 1e-5, fmt
        path = L.save_lora(model, dest, format=fmt)
    model = weights.load_unet(tmp_path / "unet")
    L.load_lora(model, path)
    assert maxdiff(run(model, unet_inputs), want) < 1e-5


def test_older_diffusers_layouts(tmp_path, tiny_unet, unet_inputs):
    """`<module>.lora.down/up.weight` and `<attn>.processor.to_q_lora.down/up.weight` load the same."""
    model = copy.deepcopy(tiny_unet)
    L.inject_lora(model, rank=3)
    randomize_lora(model, seed=7)
    want = run(model, unet_inputs)
    sd = L.lora_state_dict(model, prefix="unet")
    old = {k.replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v for k, v in sd.items()}
    proc = {}
    for k, v in sd.items():
        k = k.removeprefix("unet.").replace("to_out.0", "to_out")
        attn, proj, ab, _ = k.rsplit(".", 3)
        proc[f"{attn}.processor.{proj}_lora.{'down' if ab == 'lora_A' else 'up'}.weight"] = v
    for layout in (old, proc):
        fresh = copy.deepcopy(tiny_unet)
        L.load_lora(fresh, layout)
        assert maxdiff(run(fresh, unet_inputs), want) < 1e-6


def test_fused_loading_stacks(tmp_path, small, xs):
    """fuse=True adds each LoRA into the base weights: W + .5 (alpha/r) B1 A1 + (alpha/r) B2 A2."""
    a, b = copy.deepcopy(small), copy.deepcopy(small)
    for m, seed in ((a, 1), (b, 2)):
        L.inject_lora(m, rank=2, alpha=4, targets=SMALL_TARGETS)
        randomize_lora(m, seed)
        L.save_lora(m, tmp_path / f"{seed}.safetensors", format="kohya")
    L.set_lora_scale(a, 0.5)
    stacked = copy.deepcopy(small)
    L.load_lora(stacked, tmp_path / "1.safetensors", scale=0.5, fuse=True)
    L.load_lora(stacked, tmp_path / "2.safetensors", fuse=True)
    assert not L.lora_modules(stacked)                  # plain layers, nothing attached
    for n in ("proj_in", "conv", "attn.to_q", "attn.to_out.0"):
        want = small.get_submodule(n).weight + a.get_submodule(n).delta_weight() + b.get_submodule(n).delta_weight()
        assert maxdiff(stacked.get_submodule(n).weight, want) < 1e-6, n
    # the same as attaching the first, fusing it, then fusing the second on top
    one = copy.deepcopy(small)
    L.load_lora(one, tmp_path / "1.safetensors", scale=0.5)
    assert maxdiff(one(xs), a(xs)) < 1e-6
    L.fuse_lora(one)
    L.load_lora(one, tmp_path / "2.safetensors", fuse=True)
    assert maxdiff(stacked(xs), one(xs)) < 1e-5


def test_kohya_conv_lora_fits_linear_layer():
    """kohya stores SD1.5's 1x1 proj convs as 4-D; a model with Linear projections still loads it."""
    m = nn.Module()
    m.proj_in = nn.Linear(6, 4)
    sd = {"lora_unet_proj_in.lora_down.weight": torch.randn(2, 6, 1, 1),
          "lora_unet_proj_in.lora_up.weight": torch.randn(4, 2, 1, 1), "lora_unet_proj_in.alpha": torch.tensor(1.0)}
    L.load_lora(m, sd)
    x = torch.randn(3, 6)
    down, up = sd["lora_unet_proj_in.lora_down.weight"][:, :, 0, 0], sd["lora_unet_proj_in.lora_up.weight"][:, :, 0, 0]
    delta = 0.5 * x @ down.T @ up.T                                     # alpha 1 / rank 2
    torch.testing.assert_close(m.proj_in(x), x @ m.proj_in.weight.T + m.proj_in.bias + delta)


def test_errors_are_one_line(tmp_path, small):
    other = {"unet.mid_block.attentions.0.to_q.lora_A.weight": torch.zeros(2, 6),
             "unet.mid_block.attentions.0.to_q.lora_B.weight": torch.zeros(8, 2)}
    write_safetensors(other, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"x\.safetensors: this LoRA matches no module") as e:
        L.load_lora(small, tmp_path / "x.safetensors")
    assert "\n" not in str(e.value)
    partly = dict(other, **{"attn.to_q.lora_A.weight": torch.zeros(2, 6),
                            "attn.to_q.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(ValueError, match="1 of 2 LoRA modules are not in the model"):
        L.load_lora(small, partly)
    with pytest.raises(ValueError, match="do not fit"):
        L.load_lora(small, {"attn.to_q.lora_A.weight": torch.zeros(2, 7),
                            "attn.to_q.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(ValueError, match="only lora_A"):
        L.load_lora(small, {"attn.to_q.lora_A.weight": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="DoRA"):
        L.load_lora(small, {"attn.to_q.lora_magnitude_vector": torch.zeros(8)})
    with pytest.raises(ValueError, match="kohya_unknown"):
        L.load_lora(small, {"lora_unet_kohya_unknown.lora_down.weight": torch.zeros(2, 6),
                            "lora_unet_kohya_unknown.lora_up.weight": torch.zeros(8, 2)})
    (tmp_path / "l.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        L.load_lora(small, tmp_path / "l.pt")
    with pytest.raises(ValueError, match="no adapter_model"):
        L.load_lora(small, tmp_path)


def test_pixart_peft_adapter_in_flash_dit(tmp_path):
    """flash-pixart ships a PEFT folder (rank 64, alpha 8, wide targets): the same layout, tiny, made by
    PEFT on diffusers' PixArt transformer, loads into flash's DiT and gives PEFT's output."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=12, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True, sample_size=8).eval()
    ref.save_pretrained(tmp_path / "transformer")
    cfg = LoraConfig(r=4, lora_alpha=1, target_modules=list(L.PIXART_TARGETS), init_lora_weights="gaussian")
    pm = randomize_lora(get_peft_model(copy.deepcopy(ref), cfg), seed=4).eval()
    pm.save_pretrained(tmp_path / "lora")
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 20]), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        want = pm(x, encoder_hidden_states=ctx, timestep=t, return_dict=False)[0]
        base = ref(x, encoder_hidden_states=ctx, timestep=t, return_dict=False)[0]
    ours = weights.load_transformer(tmp_path / "transformer")
    names = L.load_lora(ours, tmp_path / "lora")
    assert len(names) == 2 * 10 + 6   # per block: q k v out x 2, ff x 2; adaLN, timestep x 2, caption x 2, proj_out
    with torch.no_grad():
        assert maxdiff(ours(x, t, ctx), want) < 1e-5
        assert maxdiff(want, base) > 1e-2
        with L.lora_disabled(ours):
            assert maxdiff(ours(x, t, ctx), base) < 1e-5
