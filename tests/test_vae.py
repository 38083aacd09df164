"""Parity of flash.vae with diffusers' AutoencoderKL (the oracle) on tiny random configs saved with
`save_pretrained` and read back by weights.load_vae; the full-size SD VAE is checked on the meta device."""
import json

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from safetensors.torch import load_file, save_file

import weights
from flash.io import CheckpointError
from flash.vae import CONFIGS, AutoencoderKL, VAEConfig
from helpers import maxdiff, randomize

TOL = 1e-5
TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=8, latent_channels=4,
            sample_size=32)   # f = 2; diffusers' default decode tile is then 16 latents


def make_ref(path, **cfg):
    ref = randomize(RefVAE(**dict(TINY, **cfg))).eval()
    ref.save_pretrained(path)
    return ref


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_encode_decode_parity(tmp_path):
    ref = make_ref(tmp_path)
    ours = weights.load_vae(tmp_path)
    assert isinstance(ours, AutoencoderKL) and ours.config.scaling_factor == ref.config.scaling_factor
    for h, w in ((32, 32), (24, 40)):
        x = rand(2, 3, h, w)
        with torch.no_grad():
            want = ref.encode(x).latent_dist
            got = ours.encode(x)
        assert got.mean.shape == (2, 4, h // 2, w // 2)
        assert maxdiff(got.mean, want.mean) <= TOL and maxdiff(got.logvar, want.logvar) <= TOL
        assert torch.equal(got.mode(), got.mean)
        # Same generator, same draw: the posterior samples agree too.
        s1 = got.sample(torch.Generator().manual_seed(3))
        s2 = want.sample(torch.Generator().manual_seed(3))
        assert maxdiff(s1, s2) <= TOL and maxdiff(s1, got.mean) > 1e-3
        z = rand(2, 4, h // 2, w // 2, seed=2)
        with torch.no_grad():
            want_img, got_img = ref.decode(z).sample, ours.decode(z)
        assert got_img.shape == (2, 3, h, w)
        assert maxdiff(got_img, want_img) <= TOL and want_img.abs().max() > 0.1


def test_logvar_is_clamped(tmp_path):
    make_ref(tmp_path)
    ours = weights.load_vae(tmp_path)
    with torch.no_grad():
        ours.quant_conv.bias[4:] = 100.0     # the logvar half of the moments
        post = ours.encode(rand(1, 3, 16, 16))
    assert post.logvar.max().item() == 20.0 and torch.isfinite(post.std).all()


def test_tiled_decode(tmp_path):
    ref = make_ref(tmp_path)
    ours = weights.load_vae(tmp_path)
    ref.enable_tiling()
    ours.use_tiling = True
    assert ours.latent_tile == ref.tile_latent_min_size == 16
    z = rand(1, 4, 24, 40, seed=4)     # 2 x 4 overlapping tiles of 16 latents, ragged at the edges
    with torch.no_grad():
        want, got, plain = ref.decode(z).sample, ours.decode(z), ours._decode(z)
    assert got.shape == plain.shape == (1, 3, 48, 80)
    assert maxdiff(got, want) <= TOL
    assert maxdiff(got, plain) > 1e-3     # tiles really were decoded separately
    small = rand(1, 4, 16, 12, seed=5)    # fits in one tile: tiling changes nothing
    with torch.no_grad():
        assert torch.equal(ours.decode(small), ours._decode(small))


def test_old_attention_key_names(tmp_path):
    # diffusers < 0.14 (and LDM, as 1x1 convs) named the mid-block attention query/key/value/proj_attn.
    ref = make_ref(tmp_path / "new")
    state = load_file(tmp_path / "new" / "diffusion_pytorch_model.safetensors")
    old = {}
    for k, v in state.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
                v = v[:, :, None, None] if v.ndim == 2 and "encoder" in k else v   # conv form for one half
        old[k] = v.contiguous()
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    ours = weights.load_vae(tmp_path / "old")
    x = rand(1, 3, 16, 16)
    with torch.no_grad():
        assert maxdiff(ours.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL
        z = rand(1, 4, 8, 8)
        assert maxdiff(ours.decode(z), ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("force_upcast", [True, False])
def test_force_upcast(tmp_path, force_upcast):
    make_ref(tmp_path, force_upcast=force_upcast)
    full = weights.load_vae(tmp_path)
    half = weights.load_vae(tmp_path, dtype=torch.float16)
    # force_upcast (the SDXL VAE overflows in fp16): the weights stay fp32 and fp16 latents decode in fp32.
    assert half.dtype == (torch.float32 if force_upcast else torch.float16)
    z = rand(1, 4, 8, 8).half()
    with torch.no_grad():
        img = half.decode(z)
    assert img.dtype == torch.float16
    if force_upcast:
        with torch.no_grad():
            assert torch.equal(img, full.decode(z.float()).half())


def test_latent_scaling():
    vae = AutoencoderKL.__new__(AutoencoderKL)     # only the config is needed
    torch.nn.Module.__init__(vae)
    vae.config = CONFIGS["sdxl"]
    z = rand(1, 4, 4, 4)
    assert torch.allclose(vae.scale_latents(z), z * 0.13025)
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z)


def test_config_json(tmp_path):
    assert VAEConfig.from_config_json(dict(SD_VAE, _class_name="AutoencoderKL", future_key=3)) == VAEConfig(
        sample_size=512, force_upcast=True)
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_config_json(dict(SD_VAE, latents_mean=[0.0] * 4))
    (tmp_path / "config.json").write_text(json.dumps(dict(SD_VAE, norm_num_groups=30)))
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        weights.load_vae(tmp_path)


# stabilityai/sd-vae-ft-mse (= the SD1.5 vae/) config.json; SDXL's adds force_upcast, scaling 0.13025, 1024 px.
SD_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
          "up_block_types": ["UpDecoderBlock2D"] * 4}
SDXL_VAE = dict(SD_VAE, force_upcast=True, scaling_factor=0.13025, sample_size=1024)


@pytest.mark.parametrize("name,raw", [("sd", SD_VAE), ("sdxl", SDXL_VAE)])
def test_full_size_structure_on_meta(name, raw):
    with torch.device("meta"):
        ref = RefVAE.from_config(raw)
        ours = AutoencoderKL(VAEConfig.from_config_json(raw))
        preset = AutoencoderKL(CONFIGS[name])
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for model in (ours, preset):
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == want, (sorted(set(got) ^ set(want))[:5])
        assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert ours.latent_tile == ref.tile_latent_min_size
    assert ours.config.scaling_factor == ref.config.scaling_factor
