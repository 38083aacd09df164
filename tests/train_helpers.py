"""Fixtures for tests/test_train.py: a tiny SD1.5-like pipeline folder saved by diffusers (the oracle, tests
only) with the shipped CLIP vocabulary, a handful of tiny captioned images, and a runner for train.py (or its
test-hook wrapper, tests/train_faults.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / "weights" / "clip_vocab"
SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}


def _randomize(model, seed, scale=0.05):
    """Perturb every parameter (zero-initialised ones too) so that every path of the model matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def make_tiny_sd(folder):
    """SD1.5-like pipeline: VAE with 2 levels (f = 2), UNet (16, 32) with cross-attention at both levels
    (mid block 32 x 4 x 4 at 16 px), CLIP with 2 layers of width 16 and the real 49,408-token vocabulary."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
                                cross_attention_dim=16, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2)
    tok = CLIPTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    pipe = StableDiffusionPipeline(vae=_randomize(vae, 1), text_encoder=_randomize(text, 2), tokenizer=tok,
                                   unet=_randomize(unet, 3), scheduler=DDIMScheduler.from_config(SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def make_images(folder, n=8, size=16, seed=0):
    """n random-blob RGB images with same-named .txt captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "dark", "bright", "round", "square", "striped"]
    for k in range(n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{k:02d}.png")
        (folder / f"img{k:02d}.txt").write_text(f"a {words[k % len(words)]} thing number {k}")
    return folder


def run_train(args, nproc=1, fault=None, check=True, timeout=300, background=False):
    """Run train.py on CPU (through torchrun when nproc > 1) with one thread per process: on this shared 2-core
    machine OpenMP barriers in 2-thread ops stall for whole time slices. A fault (FLASH_TRAIN_FAULT) or
    --check-sync runs tests/train_faults.py, train.py with those test hooks, in its place. Returns the
    CompletedProcess (or the Popen with background=True)."""
    hooked = fault or "--check-sync" in [str(a) for a in args]
    cmd = [sys.executable, str(ROOT / "tests" / "train_faults.py" if hooked else ROOT / "train.py")]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {k: v for k, v in os.environ.items() if k != "FLASH_TRAIN_FAULT"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **({"FLASH_TRAIN_FAULT": fault} if fault else {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))   # the wrapper imports train
    cmd += [str(a) for a in args]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def read_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def make_tiny_sdxl(folder):
    """SDXL-like: two CLIPs (16 and 24 wide, the second with a 20-d projection = pooled), text_time ids."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(0)

    def clip(hidden, projection=None):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=2, projection_dim=projection or hidden, bos_token_id=49406,
                             eos_token_id=49407, pad_token_id=49407)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=16, scaling_factor=0.13025, force_upcast=True)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
                                cross_attention_dim=40, attention_head_dim=(1, 2), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=20 + 6 * 8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    tok = [CLIPTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"), model_max_length=77, pad_token=p)
           for p in ("<|endoftext|>", "!")]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_randomize(vae, 4), text_encoder=_randomize(clip(16), 5),
                                     text_encoder_2=_randomize(clip(24, 20), 6), tokenizer=tok[0], tokenizer_2=tok[1],
                                     unet=_randomize(unet, 7), scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def make_tiny_pixart(folder):
    """PixArt-like: a 200-piece unigram T5 tokenizer trained here, T5 16 wide, a 2-block DiT at sample_size 128
    (so the 1024-MS resolution / aspect-ratio conditions are on; train at --resolution 16)."""
    import sentencepiece as spm
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    syllables = "ka ri to na me so lu pi de gra stro ing ed er".split()
    words = "a photo of red blue green dark bright round square striped thing number".split()
    words += ["".join(rng.choice(syllables, 3)) for _ in range(200)]
    (folder.parent / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) + f" {k}" for k in range(1500)))
    spm.SentencePieceTrainer.train(input=str(folder.parent / "corpus.txt"), model_prefix=str(folder.parent / "sp"),
                                   vocab_size=200, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    tok_dir = folder.parent / "t5_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (folder.parent / "sp.model").replace(tok_dir / "spiece.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 100, "model_max_length": 512,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)], "tokenizer_class": "T5Tokenizer"}))
    tok = T5Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8))
    dit = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                   num_layers=2, cross_attention_dim=24, caption_channels=16, sample_size=128,
                                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                   activation_fn="gelu-approximate", attention_bias=True)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=_randomize(t5, 8), vae=_randomize(vae, 9),
                               transformer=_randomize(dit, 10), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder
