"""Model parity on an accelerator: tiny SD1.5-like, SDXL-like and PixArt-like configs against diffusers, in
fp32 and bf16, on the device named by FLASH_PARITY_DEVICE (default "cuda"; skipped when it is absent).

bench/gpu.py runs this file on CUDA, where the models take the compiled Triton kernels (attention, GroupNorm
+ SiLU, LayerNorm, adaLN) and diffusers takes SDPA and cuDNN; its --dry-run points it at the CPU. The CPU
suite covers the same configs more strictly (tests/test_unet.py, tests/test_dit.py, 1e-5 in fp32).

The truth is diffusers in fp32 on the same device with TF32 off. A prediction passes when
    max |ours - truth| <= max(2 * max |diffusers_in_dtype - truth|, floor * max |truth|)
i.e. ours in bf16 is at most twice as far from the truth as diffusers in bf16. floor is 2e-3 in fp32 (the
attention kernel's fp32 dots run in TF32 on CUDA: a 10-bit mantissa) and 2e-2 in bf16.
"""
import copy
import os

import pytest
import torch
from diffusers import PixArtTransformer2DModel as RefDiT
from diffusers import UNet2DConditionModel as RefUNet

import weights
from flash.dit import additional_conditions
from helpers import randomize

DEVICE = os.environ.get("FLASH_PARITY_DEVICE", "cuda")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("no CUDA device (FLASH_PARITY_DEVICE=cpu runs these on the CPU)", allow_module_level=True)

FLOOR = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
CTX = 32
_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CTX,
             sample_size=16)
CONFIGS = {
    # SD1.5-like: conv projections, one head count everywhere (head dim 16, then 32).
    "sd15": dict(_UNET, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2),
    # SDXL-like: text_time conditioning, linear projections, no attention at the first level, depth 2.
    "sdxl": dict(_UNET, attention_head_dim=(1, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=20 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    # PixArt-like: adaLN-single blocks, size conditions, a padded caption (head dim 24).
    "pixart": dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=48, caption_channels=CTX, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
                   sample_size=16, use_additional_conditions=True, interpolation_scale=2),
}


def build(name, folder):
    """(diffusers model, ours loaded from its save_pretrained folder), both in fp32 on DEVICE."""
    torch.manual_seed(0)
    if name == "pixart":
        ref = RefDiT(**CONFIGS[name])
        ref.save_pretrained(folder)
        ours = weights.load_transformer(folder)
    else:
        ref = randomize(RefUNet(**CONFIGS[name]))
        ref.save_pretrained(folder)
        ours = weights.load_unet(folder)
    return ref.eval().to(DEVICE), ours.eval().to(DEVICE)


def inputs(name, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999, 250])
    ctx = torch.randn(2, 9, CTX, generator=g)
    extra = {}
    if name == "sdxl":
        ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(2, 1)
        extra = {"text_embeds": torch.randn(2, 20, generator=g), "time_ids": ids}
    elif name == "pixart":
        extra = {"mask": torch.tensor([[1] * 9, [1] * 4 + [0] * 5]), "added": additional_conditions(128, 128, 2)}
    move = lambda v: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)  # noqa: E731
    return move(x), t.to(DEVICE), move(ctx), {k: ({kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict)
                                                   else move(v)) for k, v in extra.items()}


def run_ref(name, ref, x, t, ctx, extra):
    if name == "pixart":
        return ref(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs=extra["added"],
                   encoder_attention_mask=extra["mask"], return_dict=False)[0]
    return ref(x, t, ctx, added_cond_kwargs=extra or None).sample


def run_ours(name, ours, x, t, ctx, extra):
    if name == "pixart":
        return ours(x, t, ctx, context_mask=extra["mask"], added_cond=extra["added"])
    return ours(x, t, ctx, added_cond=extra or None)


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_on_device(tmp_path, name, dtype):
    ref, ours = build(name, tmp_path)
    with torch.no_grad():
        truth = run_ref(name, ref, *inputs(name, torch.float32)).float()
        ref_lo, ours = copy.deepcopy(ref).to(dtype), ours.to(dtype)
        theirs = run_ref(name, ref_lo, *inputs(name, dtype)).float()
        got = run_ours(name, ours, *inputs(name, dtype))
    assert got.dtype == dtype and got.shape == truth.shape
    assert torch.isfinite(got).all()
    scale = truth.abs().max().item()
    assert scale > 0.1                       # not two near-zero outputs
    err, theirs_err = (got.float() - truth).abs().max().item(), (theirs - truth).abs().max().item()
    bound = max(2 * theirs_err, FLOOR[dtype] * scale)
    assert err <= bound, f"{name} {dtype}: max abs diff {err:.3g} > {bound:.3g} (diffusers' own {theirs_err:.3g})"


@pytest.mark.parametrize("family", ["sd15", "pixart"])
def test_graphed_sampling_equals_eager(tmp_path, family, monkeypatch):
    """flash/graphs.py on CUDA: generate's denoiser calls replayed from a CUDA graph give the eager calls'
    images, and the Python forward runs twice (the warm-up and the capture) for 4 steps with CFG, not 4 times.
    A forward that cannot be captured (PixArt's, if it copies from the host) must still give the same images."""
    if not DEVICE.startswith("cuda"):
        pytest.skip("CUDA graphs need a CUDA device")
    import flash.pipeline as fp
    from helpers import make_pixart, make_sd15
    (make_pixart if family == "pixart" else make_sd15)(tmp_path)
    pipe = weights.load_pipeline(tmp_path).to(DEVICE)
    calls = []
    inner = pipe.denoiser.forward
    monkeypatch.setattr(pipe.denoiser, "forward", lambda *a, **k: calls.append(1) or inner(*a, **k))
    with torch.inference_mode():
        graphed = fp.generate(pipe, ["a red bus"], steps=4, sampler="euler", guidance=5.0, progress=False)
        n_graphed = len(calls)
        monkeypatch.setattr(fp, "graphed", lambda forward, device: forward)
        eager = fp.generate(pipe, ["a red bus"], steps=4, sampler="euler", guidance=5.0, progress=False)
    assert torch.isfinite(graphed).all() and graphed.shape == eager.shape
    assert (graphed - eager).abs().max().item() <= 1e-4
    if family == "sd15":
        assert n_graphed == 2, f"the forward ran {n_graphed} times for 4 steps; a graph replays without Python"
