"""weights/save.py: a flash Pipeline saved as a diffusers folder reloads bit for bit with weights.load_pipeline,
and diffusers (the oracle, offline) loads the same folder and draws the same images for the same seed.

The SD case is the digits pipeline of recipes/digits_init.py itself (the architecture that is shipped: a
3-level f = 4 VAE, a 32-wide CLIP over the real vocabulary, a DDIM "trailing" scheduler config); SDXL and
PixArt use tiny random configs built with our own classes. Every parameter is perturbed after construction
(zero biases, unit norms included), so a tensor saved under the wrong name or a config field lost on the
way cannot pass. Bound for diffusers: 2/255 on fp32 images (the acceptance bound); measured about 1e-6.
"""
import copy
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

import weights
from flash import clip, t5
from flash.dit import PixArtConfig, PixArtTransformer2DModel
from flash.pipeline import Pipeline, generate
from flash.tokenizer import SentencePieceModel, clip_tokenizer, read_clip_vocab, t5_tokenizer
from flash.unet import UNet2DConditionModel, UNetConfig
from flash.vae import AutoencoderKL, VAEConfig
from helpers import randomize
from recipes.digits_init import build as build_digits
from weights.save import folder_size, save_pipeline, save_text_encoder, save_unet, save_vae

VOCAB = "weights/clip_vocab"
PROMPTS = ["a handwritten digit seven", "the number 3"]
ACCEPT = 2 / 255


def clip_tok(pad="<|endoftext|>"):
    return clip_tokenizer(*read_clip_vocab(f"{VOCAB}/vocab.json", f"{VOCAB}/merges.txt"), pad_token=pad)


def digits_pipe():
    pipe = build_digits(seed=0)
    for i, m in enumerate([pipe.unet, pipe.vae, *pipe.text_encoders]):
        randomize(m, 10 + i, scale=0.02)
    return pipe


def tiny_vae(seed, **kw):
    cfg = VAEConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                    sample_size=16, force_upcast=False, **kw)
    return randomize(AutoencoderKL(cfg), seed)


def tiny_clip(seed, hidden, projection=None):
    cfg = clip.CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, eos_token_id=49407, projection_dim=projection or hidden,
                              with_projection=projection is not None)
    return randomize(clip.CLIPTextModel(cfg), seed)


def sdxl_pipe():
    unet = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16 + 24,
                      attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=20 + 6 * 8)
    scheduler = dict(weights.pipeline.SCHEDULER_CONFIGS["sdxl"], _class_name="EulerDiscreteScheduler")
    return Pipeline(family="sdxl", vae=tiny_vae(4, scaling_factor=0.13025),
                    text_encoders=[tiny_clip(5, 16), tiny_clip(7, 24, projection=20)],
                    tokenizers=[clip_tok(), clip_tok("!")], scheduler_config=scheduler,
                    unet=randomize(UNet2DConditionModel(unet), 6), config={"force_zeros_for_empty_prompt": True})


def t5_tok():
    """A hand-made unigram vocabulary with T5's special ids (pad 0, eos 1, unk 2) and two sentinels."""
    words = ["▁a", "▁handwritten", "▁digit", "▁seven", "▁the", "▁number", "▁3", "▁cat"]
    chars = ["▁"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = ([("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)] + [(w, -2.0, 1) for w in words]
              + [(c, -8.0, 1) for c in chars])
    spm = SentencePieceModel(pieces=pieces, unk_id=2, bos_id=-1, eos_id=1, pad_id=0)
    return t5_tokenizer(spm, extra_ids=2, model_max_length=120)


def pixart_pipe():
    tok = t5_tok()
    enc = t5.T5EncoderModel(t5.T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                        num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    cfg = PixArtConfig(num_attention_heads=2, attention_head_dim=12, num_layers=2, cross_attention_dim=24,
                       caption_channels=16, sample_size=8, patch_size=2)
    return Pipeline(family="pixart", vae=tiny_vae(11), text_encoders=[randomize(enc, 12)], tokenizers=[tok],
                    scheduler_config=dict(weights.pipeline.SCHEDULER_CONFIGS["pixart"]),
                    transformer=randomize(PixArtTransformer2DModel(cfg), 13))


def assert_same_weights(a, b, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k] if dtype is None else sa[k].to(dtype)
        assert sb[k].dtype == want.dtype and torch.equal(sb[k], want), k


def assert_same_pipeline(pipe, back):
    assert back.family == pipe.family
    assert_same_weights(pipe.vae, back.vae)
    assert_same_weights(pipe.denoiser, back.denoiser)
    assert len(back.text_encoders) == len(pipe.text_encoders) and len(back.tokenizers) == len(pipe.tokenizers)
    for a, b in zip(pipe.text_encoders, back.text_encoders):
        assert_same_weights(a, b)
    texts = PROMPTS + ["", "A red BUS, 2024!! <extra_id_0>"]
    for a, b in zip(pipe.tokenizers, back.tokenizers):
        length = 120 if pipe.family == "pixart" else None
        assert torch.equal(a(texts, max_length=length)[0], b(texts, max_length=length)[0])
    for key, value in pipe.scheduler_config.items():
        assert back.scheduler_config[key] == value, key


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("save") / "digits"
    pipe = digits_pipe()
    save_pipeline(pipe, folder)
    return pipe, folder


def test_digits_folder_reloads_bit_for_bit(digits):
    pipe, folder = digits
    back = weights.load_pipeline(folder)
    assert_same_pipeline(pipe, back)
    assert back.vae_scale_factor == 4 and back.default_size == 32
    for sampler, guidance in (("flash", 0.0), ("ddim", 3.0)):
        a = generate(pipe, PROMPTS, steps=2, sampler=sampler, guidance=guidance, seed=3, progress=False)
        b = generate(back, PROMPTS, steps=2, sampler=sampler, guidance=guidance, seed=3, progress=False)
        assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    # No temp files left behind, and every file readable by all (mkstemp makes 0600 files).
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in files)
    # The tokenizer files are the shipped CLIP vocabulary, byte for byte.
    for name in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).read_bytes() == open(f"{VOCAB}/{name}", "rb").read()


@pytest.mark.parametrize("sampler,steps,guidance", [("ddim", 4, 3.0), ("dpm++2m", 4, 3.0), ("lcm", 4, 0.0)])
def test_diffusers_loads_the_folder_and_draws_the_same_images(digits, sampler, steps, guidance):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline
    pipe, folder = digits
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(theirs.scheduler) is DDIMScheduler and theirs.safety_checker is None
    cls = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "lcm": LCMScheduler}[sampler]
    theirs.scheduler = cls.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                 generator=torch.Generator().manual_seed(5)).images
    ours = generate(pipe, PROMPTS, steps=steps, sampler=sampler, guidance=guidance, seed=5, progress=False)
    assert ref.shape == ours.shape == (2, 3, 32, 32)
    diff = (ref - ours).abs().max().item()
    print(f"{sampler}: max |diffusers - flash| = {diff:.2e}")
    assert diff < ACCEPT, f"{sampler}: max |diffusers - flash| = {diff:.2e}"


def test_fp16_storage(digits, tmp_path):
    pipe, _ = digits
    folder = save_pipeline(pipe, tmp_path / "fp16", dtype=torch.float16)
    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["torch_dtype"] == "float16"
    back = weights.load_pipeline(folder, dtype=None)
    assert back.dtype == torch.float16
    for a, b in ((pipe.unet, back.unet), (pipe.vae, back.vae), (pipe.text_encoders[0], back.text_encoders[0])):
        assert_same_weights(a, b, torch.float16)
    assert folder_size(folder) < 0.6 * folder_size(digits[1])


def test_components_alone(digits, tmp_path):
    """The per-component writers give folders that the component loaders read (and the transformers /
    diffusers classes, for the config fields' names)."""
    from diffusers import AutoencoderKL as TheirVAE, UNet2DConditionModel as TheirUNet
    from transformers import CLIPTextModel as TheirCLIP
    pipe, _ = digits
    save_unet(pipe.unet, tmp_path / "unet")
    save_vae(pipe.vae, tmp_path / "vae")
    save_text_encoder(pipe.text_encoders[0], tmp_path / "te")
    assert_same_weights(pipe.unet, weights.load_unet(tmp_path / "unet"))
    assert_same_weights(pipe.vae, weights.load_vae(tmp_path / "vae"))
    assert_same_weights(pipe.text_encoders[0], weights.load_text_encoder(tmp_path / "te"))
    unet_cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert unet_cfg["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in unet_cfg
    assert list(TheirUNet.from_pretrained(tmp_path / "unet").config.block_out_channels) == [64, 128]
    assert list(TheirVAE.from_pretrained(tmp_path / "vae").config.block_out_channels) == [32, 64, 64]
    ids = pipe.tokenizers[0](PROMPTS)[0]
    theirs = TheirCLIP.from_pretrained(tmp_path / "te").eval()
    with torch.no_grad():
        ref = theirs(ids).last_hidden_state
        ours = pipe.text_encoders[0](ids).last_hidden_state
    assert (ref - ours).abs().max() < 1e-5


def test_sdxl(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    pipe = sdxl_pipe()
    folder = save_pipeline(pipe, tmp_path / "sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    back = weights.load_pipeline(folder)
    assert_same_pipeline(pipe, back)
    assert back.tokenizers[1].pad_token_id == 0        # tokenizer_2 pads with "!"
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(1)).images
    ours = generate(back, PROMPTS, steps=4, sampler="ddim", guidance=3.0, seed=1, progress=False)
    assert (ref - ours).abs().max().item() < ACCEPT


def test_pixart(tmp_path):
    from diffusers import PixArtTransformer2DModel as TheirDiT
    from transformers import T5EncoderModel as TheirT5
    pipe = pixart_pipe()
    folder = save_pipeline(pipe, tmp_path / "pixart")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
    back = weights.load_pipeline(folder)
    assert_same_pipeline(pipe, back)
    a = generate(pipe, PROMPTS, steps=2, sampler="dpm++2m", guidance=2.0, seed=0, progress=False)
    assert torch.equal(a, generate(back, PROMPTS, steps=2, sampler="dpm++2m", guidance=2.0, seed=0, progress=False))
    # The upstream classes read the component folders with the same numbers.
    ids, mask = pipe.tokenizers[0](PROMPTS, max_length=120)
    with torch.no_grad():
        ref = TheirT5.from_pretrained(folder / "text_encoder").eval()(ids, attention_mask=mask).last_hidden_state
        context = pipe.text_encoders[0](ids, attention_mask=mask)
        assert (ref - context).abs().max() < 1e-5
        x = torch.randn(2, 4, 8, 8)
        dit = TheirDiT.from_pretrained(folder / "transformer").eval()
        ref = dit(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=torch.tensor([500, 500]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        ours = pipe.transformer(x, 500, context, context_mask=mask)
    assert (ref - ours).abs().max() < 1e-4


def test_lora_adapters(digits, tmp_path):
    """Unfused adapters are refused (the base weights alone would drop them); fused ones are saved as part
    of the weights, which then load into a plain UNet."""
    from flash.lora import fuse_lora, inject_lora
    pipe, _ = digits
    unet = copy.deepcopy(pipe.unet)
    inject_lora(unet, rank=2)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    with pytest.raises(ValueError, match="unfused LoRA adapters .* fuse_lora"):
        save_unet(unet, tmp_path / "unet")
    fuse_lora(unet)
    save_unet(unet, tmp_path / "unet")
    back = weights.load_unet(tmp_path / "unet")
    fused = {k: v for k, v in unet.state_dict().items() if ".lora_" not in k}
    assert fused.keys() == back.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in fused.items())
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"     # a LoRA target
    assert not torch.equal(back.state_dict()[key], pipe.unet.state_dict()[key])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not a CLIPTextModel or T5EncoderModel"):
        save_text_encoder(torch.nn.Linear(2, 2), tmp_path / "te")
    pipe = pixart_pipe()
    pipe.task = "inpaint"
    with pytest.raises(ValueError, match="no diffusers pipeline class for family 'pixart' \\(inpainting\\)"):
        save_pipeline(pipe, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
