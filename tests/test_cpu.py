"""flash/cpu.py: which dtype a run gets by default (with and without native bf16 units, faked both ways), that
only the 16-bit CPU path changes layout, and that the channels-last bf16 VAE decodes what NCHW decodes."""
import pytest
import torch

import flash.cpu
from flash.cli import dtype_name
from flash.pipeline import decode
from flash.vae import AutoencoderKL, VAEConfig
from helpers import randomize


@pytest.mark.parametrize("native", [False, True])
def test_default_dtype(monkeypatch, native):
    monkeypatch.setattr(flash.cpu, "native_bf16", lambda: native)
    assert dtype_name(None, "cpu") == ("bf16" if native else "fp32")
    assert dtype_name(None, "cpu", cpu_bf16=False) == "fp32"          # eval.py's reference rows
    assert dtype_name(None, "cuda") == "fp16" and dtype_name("fp32", "cpu") == "fp32"
    # training: bf16 autocast was slower on every digits stage on such a CPU, so CPUs train in fp32
    assert not flash.cpu.train_autocast("cpu", "auto")._enabled and not flash.cpu.train_autocast("cpu", "fp32")._enabled


def test_native_bf16_agrees_with_torch():
    """The detection is torch's own CPUID check (no /proc parsing): a bool, and False without oneDNN."""
    assert isinstance(flash.cpu.native_bf16(), bool)
    if not torch.backends.mkldnn.is_available():
        assert not flash.cpu.native_bf16()


def tiny_vae():
    cfg = VAEConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    return randomize(AutoencoderKL(cfg))


def test_only_the_16bit_cpu_path_goes_channels_last():
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(1))
    vae = tiny_vae()
    def pipe(v):     # what decode reads of a pipeline
        return type("P", (), {"vae": v, "vae_scale_factor": 2 ** (len(v.config.block_out_channels) - 1)})()
    with torch.no_grad():
        want = decode(pipe(vae), z)                  # fp32: layout untouched, so the parity tests' bits stay
        assert vae.decoder.conv_in.weight.is_contiguous()
        nchw = decode(pipe(tiny_vae().to(torch.bfloat16)), z)
        got = decode(pipe(vae.to(torch.bfloat16)), z)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max() < 0.05 and (got - nchw).abs().max() < 0.05   # bf16 rounding only
