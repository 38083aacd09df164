"""flash.adapter.T2IAdapter and the UNet's image-condition inputs against diffusers (the oracle): adapter
features for full_adapter and full_adapter_xl, UNet outputs with `down_intrablock_additional_residuals`
(SD1.5-like and SDXL-like, where the residual goes after a downsampler and into the mid block), and the
`concat` channels of an inpainting UNet."""
import pytest
import torch
from diffusers import T2IAdapter as RefAdapter
from diffusers import UNet2DConditionModel as RefUNet

import weights
from flash.adapter import AdapterConfig, T2IAdapter
from tests.test_unet import TINY, inputs, maxdiff, randomize

ADAPTERS = {
    "full_adapter": dict(in_channels=1, channels=[32, 64, 64], num_res_blocks=2, downscale_factor=4,
                         adapter_type="full_adapter"),
    "full_adapter_xl": dict(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4,
                            adapter_type="full_adapter_xl"),
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter_pair(request, tmp_path_factory):
    ref = randomize(RefAdapter(**ADAPTERS[request.param]), seed=3).eval()
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, weights.load_adapter(folder)


def test_adapter_features_match_diffusers(adapter_pair):
    name, ref, ours = adapter_pair
    cfg = ADAPTERS[name]
    image = torch.rand(2, cfg["in_channels"], 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(image), ours(image)
    assert len(got) == len(want) == len(cfg["channels"])
    for a, b in zip(got, want):
        assert a.shape == b.shape and maxdiff(a, b) == 0.0
    assert ours.total_downscale_factor == ref.total_downscale_factor
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_adapter_scale_and_errors():
    ours = T2IAdapter(AdapterConfig(**{**ADAPTERS["full_adapter"], "channels": (8, 8)}))
    image = torch.rand(1, 1, 16, 16)
    base, half = ours(image), ours(image, scale=0.5)
    assert all(torch.allclose(h, b * 0.5) for h, b in zip(half, base))
    with pytest.raises(ValueError, match="1-channel condition images, got 3"):
        ours(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        ours(torch.rand(1, 1, 18, 16))
    with pytest.raises(ValueError, match="light_adapter"):
        AdapterConfig.from_config_json({"adapter_type": "light_adapter"})


@pytest.mark.parametrize("name,adapter", [("sd15", "full_adapter"), ("sdxl", "full_adapter_xl")])
def test_unet_with_adapter_residuals_matches_diffusers(name, adapter, tmp_path):
    """sd15-like: 3 levels (attention, attention, none): a feature after the last (ResNet, attention) pair of
    each attention level and one on the last level's output. sdxl-like: the first level has no attention and
    a downsampler (the feature goes after it, into the skip too), and a fourth feature reaches the mid block."""
    ref = randomize(RefUNet(**TINY[name])).eval()
    ref.save_pretrained(tmp_path)
    ours = weights.load_unet(tmp_path)
    x, ctx, added = inputs(name, 16, 16)
    chans = [32, 64, 64] if name == "sd15" else [32, 64, 64, 64]
    sides = [16, 8, 4] if name == "sd15" else [8, 8, 4, 4]      # XL: the first level's output is after its downsampler
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, c, s, s, generator=g) for c, s in zip(chans, sides)]
    with torch.no_grad():
        want = ref(x, 500, ctx, added_cond_kwargs=added,
                   down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        plain = ref(x, 500, ctx, added_cond_kwargs=added).sample
        got = ours(x, 500, ctx, added_cond=added, adapter_residuals=feats)
    assert maxdiff(want, plain) > 1e-2           # the residuals matter
    assert maxdiff(got, want) < 1e-5


def test_unet_concat_is_channel_concatenation(tmp_path):
    ref = randomize(RefUNet(**TINY["inpaint"])).eval()
    ref.save_pretrained(tmp_path)
    ours = weights.load_unet(tmp_path)
    x, ctx, _ = inputs("inpaint", 16, 16)
    with torch.no_grad():
        want = ref(x, 300, ctx).sample
        got = ours(x[:, :4], 300, ctx, concat=x[:, 4:])
    assert maxdiff(got, want) < 1e-5
    with pytest.raises(ValueError, match="takes 9 input channels, got 4"):
        ours(x[:, :4], 300, ctx)
