"""Step 1 of the digits recipe: a tiny latent text-to-image pipeline for 32x32 digits in the standard Stable
Diffusion layout, randomly initialised and saved as a diffusers pipeline folder (weights/save.py).

    python recipes/digits_init.py --out runs/digits/init [--seed 0] [--preset base|small] [--dtype fp32|fp16]

The architecture is SD1.5's, scaled down (flash/vae.py, flash/clip.py, flash/unet.py; their config fields):
- AutoencoderKL with 3 levels, f = 4: a 3x32x32 image <-> a 4x8x8 latent (SD: 8 levels of 2, f = 8, 4x64x64).
- A 2-layer CLIP text encoder, 32 wide, over the real CLIP tokenizer (weights/clip_vocab: 49,408 tokens, 77
  positions). Most of its parameters are the token table, which the real vocabulary fixes.
- An SD-style UNet with cross-attention at both latent resolutions (8x8 and 4x4), eps prediction.
- SD's scaled_linear noise schedule (betas 0.00085 -> 0.012, 1000 steps), written as a DDIMScheduler config
  with "trailing" spacing (Lin et al. 2023): a few-step teacher then starts at t = 999, where the Flash
  student starts (flash_timesteps), instead of SD's "leading" t = 751 at 4 steps. The LCM / Flash samplers
  ignore the spacing; their other fields (original_inference_steps 50, timestep_scaling 10) are left at the
  diffusers defaults, so the config loads into DDIMScheduler and LCMScheduler without unused keys.

NOTE the VAE's scaling_factor is 1.0 here. It must be set after the VAE is trained, to 1 / std of the
training latents (SD's 0.18215 was found that way), so that the diffusion model sees unit-variance
latents; the recipe's VAE stage writes it into vae/config.json.

Initialisation: PyTorch's defaults, except CLIP's embeddings (normal, std 0.02 for tokens and 0.01 for
positions, as transformers initialises CLIP), so the text states start at CLIP's scale.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from flash.pipeline import Pipeline  # noqa: E402
from flash.tokenizer import clip_tokenizer, read_clip_vocab  # noqa: E402
from flash.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from flash.vae import AutoencoderKL, VAEConfig  # noqa: E402
from weights.save import DIFFUSERS_VERSION, folder_size, save_pipeline  # noqa: E402

CLIP_VOCAB = ROOT / "weights" / "clip_vocab"
IMAGE_SIZE = 32

VAE = VAEConfig(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE, scaling_factor=1.0,
                force_upcast=False)
TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                      eos_token_id=49407, projection_dim=32)
_UNET = dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, attention_head_dim=4,
             cross_attention_dim=TEXT.hidden_size, norm_num_groups=32,
             down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
UNETS = {
    "base": UNetConfig(block_out_channels=(64, 128), layers_per_block=1, **_UNET),   # 4.1M parameters
    "small": UNetConfig(block_out_channels=(32, 64), layers_per_block=2, **_UNET),   # 1.5M parameters
}
SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
             "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "trailing", "steps_offset": 1,
             "set_alpha_to_one": False, "clip_sample": False, "clip_sample_range": 1.0, "thresholding": False,
             "rescale_betas_zero_snr": False}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def init_clip(model):
    """CLIP's embedding initialisation (transformers' CLIPTextEmbeddings): N(0, 0.02) tokens, N(0, 0.01)
    positions. PyTorch's N(0, 1) default would make the embeddings dwarf every residual branch."""
    emb = model.text_model.embeddings
    torch.nn.init.normal_(emb.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)
    return model


def build(seed=0, preset="base"):
    """A randomly initialised flash Pipeline (family "sd15") for 32x32 digits; one seed, one set of weights."""
    if preset not in UNETS:
        raise ValueError(f"preset must be one of {', '.join(UNETS)}, got {preset!r}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAE).eval()
    text = init_clip(CLIPTextModel(TEXT)).eval()
    unet = UNet2DConditionModel(UNETS[preset]).eval()
    tokenizer = clip_tokenizer(*read_clip_vocab(CLIP_VOCAB / "vocab.json", CLIP_VOCAB / "merges.txt"))
    return Pipeline(family="sd15", vae=vae, text_encoders=[text], tokenizers=[tokenizer],
                    scheduler_config=dict(SCHEDULER), unet=unet, config={})


def count(model):
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: %(default)s)")
    p.add_argument("--preset", choices=UNETS, default="base", help="UNet size (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="storage dtype; training starts from fp32 weights (default: %(default)s)")
    args = p.parse_args(argv)
    pipe = build(args.seed, args.preset)
    out = save_pipeline(pipe, args.out, dtype=DTYPES[args.dtype])
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoders[0]}
    for name, model in parts.items():
        print(f"{name:13s} {count(model):>10,d} parameters")
    print(f"{'total':13s} {sum(map(count, parts.values())):>10,d} parameters")
    print(f"wrote {out} ({folder_size(out) / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
