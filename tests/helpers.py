"""What the test files share: the comparison, the perturbation that makes a mis-wired key show, and tiny random
components built with the oracles (diffusers, transformers) over real tokenizers: the shipped CLIP vocabulary
(weights/clip_vocab) and a small SentencePiece unigram model trained here for T5 (no T5 vocabulary exists
offline). pytest finds this module through `pythonpath` in pyproject.toml."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from flash.data import DIGITS_FILE
from flash.metrics import INCEPTION_FILE
from flash.tasks import extra_channels
from recipes.digits_init import build as build_digits
from recipes.digits_tasks_init import new_adapter, widen

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / "weights" / "clip_vocab"

# The released SD1.5 scheduler_config.json: a PNDM config without timestep_spacing or clip_sample, so each
# sampler takes those from its own diffusers class (Euler and DPM-Solver space "linspace", DDIM "leading").
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}

# For the tests that need the real digits and the FID Inception (fetched by the README's test command).
needs_data = pytest.mark.skipif(not (DIGITS_FILE.is_file() and INCEPTION_FILE.is_file()),
                                reason="digits data or FID Inception absent: run `python -m flash.data fetch` "
                                       "and `python -m flash.metrics fetch`")


def maxdiff(a, b):
    return (a - b).abs().max().item()


def randomize(model, seed=0, scale=0.05):
    """Perturb every parameter (norm weights, zero-initialised biases and convs too) with seeded noise, so that a
    tensor loaded under the wrong name, or an input wired to the wrong place, changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


# ------------------------------------------------------------------------------ tokenizers (oracle side)

def hf_clip_tokenizer(pad="<|endoftext|>"):
    """transformers' CLIPTokenizer over the shipped vocabulary; SD1.5 pads with the end token, SDXL's second
    tokenizer (and SD2's) with "!"."""
    return CLIPTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"), model_max_length=77, pad_token=pad)


def make_corpus(path, seed=0):
    """1,500 lines of prompt-like text: common words plus made-up ones, for training a small unigram model."""
    rng = random.Random(seed)
    words = ("a photo of cat dog red bus on the moon astronaut riding horse painting by van gogh city street at "
             "night portrait woman man blue green cinematic lighting highly detailed").split()
    words += ["".join(rng.choice("ka ri to na me so lu pi de gra stro ing ed er".split()) for _ in range(3))
              for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice([".", "!", ""])
             for _ in range(1500)]
    path.write_text("\n".join(lines))


def hf_t5_tokenizer(root):
    """A 200-piece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos), trained here, saved as a
    T5 tokenizer folder (root/t5_tokenizer) and loaded by transformers."""
    import sentencepiece as spm     # a test-only dependency, needed by the T5 fixtures alone
    make_corpus(root / "corpus.txt")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder = root / "t5_tokenizer"
    folder.mkdir()
    shutil.copy(root / "sp.model", folder / "spiece.model")
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(specials, extra_ids=100, model_max_length=512,
                                                                  tokenizer_class="T5Tokenizer")))
    return T5Tokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------ tiny oracle components

def tiny_vae(seed, **kw):
    """A 2-level AutoencoderKL (f = 2), 16 / 32 channels."""
    return randomize(AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                   norm_num_groups=8, sample_size=16, **kw), seed)


def tiny_clip(seed, hidden=32, layers=2, act="quick_gelu", projection=None, eos=2):
    """A CLIP text tower over the real 49,408-token vocabulary (with a projection: SDXL's second encoder).
    eos_token_id 2 is what the released SD configs say (legacy argmax pooling); 49407 is what newer ones say."""
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=eos, pad_token_id=49407)
    return randomize((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), seed)


def tiny_unet(seed, cross, **kw):
    """A 2-level cross-attention UNet (16 / 32 channels, one layer per block)."""
    return randomize(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8, cross_attention_dim=cross,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **kw), seed)


def make_sd15(folder):
    """An SD1.5-like diffusers pipeline saved to `folder`: one CLIP (last hidden state), conv projections, the
    released PNDM scheduler config."""
    pipe = StableDiffusionPipeline(vae=tiny_vae(1), text_encoder=tiny_clip(2, 16, eos=49407),
                                   tokenizer=hf_clip_tokenizer(), unet=tiny_unet(3, 16, attention_head_dim=2),
                                   scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    return pipe



def make_pixart(folder, with_text=True, t5_buckets=32):
    """A PixArt-like diffusers pipeline saved to `folder`: a tiny T5 (16 wide, `t5_buckets` relative position
    buckets) with its tokenizer, or neither (`with_text=False`: a PixArt folder without a T5 vocabulary); a tiny
    transformer with sample_size 128, so the 1024-MS resolution / aspect-ratio conditions are on; the
    DPM-Solver scheduler config PixArt ships (linear betas, no clip_sample key)."""
    tok = t5 = None
    if with_text:
        tok = hf_t5_tokenizer(folder.parent)
        t5 = randomize(T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=2, feed_forward_proj="gated-gelu",
                                               relative_attention_num_buckets=t5_buckets)), 8)
    transformer = randomize(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=16, sample_size=128, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True), 9)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=tiny_vae(10), transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe

# ------------------------------------------------------------------------------ the digits task pipelines

def task_pipeline(task, seed=1):
    """The small random digits pipeline made into a `task` one; the new weights perturbed, so the
    condition reaches the output (digits_tasks_init zero-initialises them)."""
    pipe = build_digits(seed=seed, preset="small")
    g = torch.Generator().manual_seed(seed)
    if task == "adapter":
        pipe.adapter = new_adapter(pipe.unet, pipe.vae_scale_factor, seed)
        with torch.no_grad():
            for p in pipe.adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    else:
        pipe.unet = widen(pipe.unet, extra_channels(task, pipe.vae.config.latent_channels))
        with torch.no_grad():
            pipe.unet.conv_in.weight[:, 4:] = torch.randn(pipe.unet.conv_in.weight[:, 4:].shape, generator=g) * 0.1
    pipe.task = task
    return pipe
