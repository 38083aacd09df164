"""Parity of flash.taesd with diffusers' AutoencoderTiny (the oracle) on tiny random configs saved with
`save_pretrained` and read back by weights.load_tiny_vae, in the taesd (4 latent channels, no scaling) and
taesd3 (16 channels, scaling and shift) shapes; and sample.py --tiny-vae on a tiny SD1.5-like pipeline."""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny as RefTiny

import sample
import weights
from flash.io import CheckpointError
from flash.pipeline import decode
from flash.taesd import AutoencoderTiny
from helpers import make_sd15, maxdiff, randomize

TOL = 1e-5
TINY = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(16, 16, 16),
            num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1))      # f = 4


def make_ref(path, **cfg):
    ref = randomize(RefTiny(**dict(TINY, **cfg)), scale=0.1)
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("cfg", [{}, dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)],
                         ids=["taesd", "taesd3"])
def test_decode_encode_parity(tmp_path, cfg):
    ref = make_ref(tmp_path, **cfg)
    ours = weights.load_tiny_vae(tmp_path)
    assert isinstance(ours, AutoencoderTiny) and ours.config.latent_channels == ref.config.latent_channels
    c = ref.config.latent_channels
    g = torch.Generator().manual_seed(1)
    z, x = torch.randn(2, c, 6, 10, generator=g), torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
    with torch.no_grad():
        want, got = ref.decode(z).sample, ours.decode(z)
        assert got.shape == (2, 3, 24, 40) and maxdiff(got, want) < TOL
        assert maxdiff(ours.encode(x), ref.encode(x).latents) < TOL
        # the pipeline's decode: diffusers' pipelines divide by scaling_factor and add shift_factor
        pipe = type("P", (), {"vae": ours, "vae_scale_factor": 2 ** (len(ours.config.block_out_channels) - 1)})()
        images = decode(pipe, z)
        raw = z / ref.config.scaling_factor + (ref.config.shift_factor or 0)
        assert maxdiff(images, (ref.decode(raw).sample / 2 + 0.5).clamp(0, 1)) < TOL


def test_unsupported_config(tmp_path):
    make_ref(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "act_fn": "silu"}))
    with pytest.raises(CheckpointError, match="act_fn"):
        weights.load_tiny_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_block_out_channels": [16, 8, 8]}))
    with pytest.raises(CheckpointError, match="must all be equal"):
        weights.load_tiny_vae(tmp_path)


def test_sample_cli_tiny_vae(tmp_path, capsys):
    """--tiny-vae replaces only the decoder: the PNG equals diffusers' pipeline with its vae swapped for the
    same AutoencoderTiny (LCM, 2 steps), rounded to 8 bits; PNG metadata names it and the dtype."""
    from diffusers import LCMScheduler
    from PIL import Image
    ref = make_sd15(tmp_path / "sd")
    make_ref(tmp_path / "taesd", encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
             num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))                # f = 2, as the tiny SD VAE's
    out = tmp_path / "x.png"
    argv = ["--model", str(tmp_path / "sd"), "--prompt", "a cat", "--steps", "2", "--sampler", "lcm",
            "--dtype", "fp32", "--out", str(out), "--tiny-vae"]
    assert sample.main(argv + [str(tmp_path / "taesd")]) == 0
    image = Image.open(out)
    assert (image.text["tiny_vae"], image.text["dtype"]) == (str(tmp_path / "taesd"), "fp32")
    ref.vae = RefTiny.from_pretrained(tmp_path / "taesd")
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = ref("a cat", num_inference_steps=2, guidance_scale=0.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
    got = np.asarray(image).astype(np.float64) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6 < np.abs(got - want[::-1]).max()
    capsys.readouterr()
    assert sample.main(argv + [str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --tiny-vae {tmp_path / 'nope'}: no such folder"
