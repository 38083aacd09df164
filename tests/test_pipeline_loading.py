"""weights.load_pipeline on diffusers pipeline folders: tiny random SD1.5-like, SD2-like, SDXL-like, inpainting
and PixArt-like pipelines assembled and saved by diffusers (`pipeline.save_pretrained`), with real tokenizers
(the shipped CLIP vocabulary; a small SentencePiece model trained here for T5). Every loaded component is
checked against the diffusers / transformers object it was saved from (fp32, max abs diff <= 1e-5), and the
family, the scheduler config and the errors are checked too.

The builders and checks here are shared with tests/test_single_file.py, which writes the same pipelines as
single files; the tiny components come from tests/helpers.py.
"""
import json
import shutil

import pytest
import torch
from diffusers import (EulerDiscreteScheduler, PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)

import weights
from flash.io import CheckpointError
from flash.pipeline import Pipeline
from helpers import hf_clip_tokenizer, make_pixart, maxdiff, randomize, tiny_clip, tiny_vae

TOL = 1e-5
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the Moon, 2024!!"]
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


# The UNets. SD-like: 3 levels, 2 layers per block (the released numbering of LDM's input/output_blocks), conv
# projections. SDXL-like: 1 layer per block, no attention at the first level, 2 transformer blocks deeper.
UNETS = {
    "sd15": dict(block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=2, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, sample_size=8),
    "sdxl": dict(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=(1, 2, 4), norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 2), cross_attention_dim=32 + 32, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8, sample_size=8),
}
UNETS["sd2"] = dict(UNETS["sd15"], attention_head_dim=(2, 4, 4), use_linear_projection=True)
UNETS["inpaint"] = dict(UNETS["sd15"], in_channels=9)


def make_sd(folder, kind="sd15"):
    """SD1.5-like (CLIP quick_gelu, eos padding), SD2-like (OpenCLIP-like gelu, "!" padding, linear
    projections) or an SD1.5-like inpainting pipeline (9-channel UNet), saved by diffusers."""
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    sd2 = kind == "sd2"
    pipe = cls(vae=tiny_vae(1), text_encoder=tiny_clip(2, act="gelu" if sd2 else "quick_gelu"),
               tokenizer=hf_clip_tokenizer("!" if sd2 else "<|endoftext|>"),
               unet=randomize(UNet2DConditionModel(**UNETS[kind]), 3),
               scheduler=PNDMScheduler(**SD_SCHEDULER, set_alpha_to_one=False, skip_prk_steps=True),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def make_sdxl(folder):
    """SDXL-like: CLIP-L-like (32, quick_gelu) ++ bigG-like (32, gelu, 3 layers, projection 24) text states,
    text_time conditioning (pooled 24 + 6 ids x 8), tokenizer_2 padding with "!"."""
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(4, scaling_factor=0.13025, force_upcast=True), text_encoder=tiny_clip(5),
        text_encoder_2=tiny_clip(6, layers=3, act="gelu", projection=24, eos=49407), tokenizer=hf_clip_tokenizer(),
        tokenizer_2=hf_clip_tokenizer(pad="!"), unet=randomize(UNet2DConditionModel(**UNETS["sdxl"]), 7),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading"), add_watermarker=False)
    pipe.save_pretrained(folder)
    return pipe


# ------------------------------------------------------------------------------------------ comparisons

def check_tokenizer(ours, theirs, length=77):
    want = theirs(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    ids, mask = ours(PROMPTS, max_length=length)
    assert torch.equal(ids, want.input_ids) and torch.equal(mask, want.attention_mask)
    return ids


@torch.no_grad()
def check_clip(ours, theirs, ids):
    """last hidden state (SD1.x), penultimate (SDXL) and the pooled / projected embedding."""
    out, ref = ours(ids), theirs(ids, output_hidden_states=True)
    pooled = ref.text_embeds if hasattr(ref, "text_embeds") else ref.pooler_output
    assert maxdiff(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert maxdiff(out.penultimate_hidden_state, ref.hidden_states[-2]) <= TOL
    assert maxdiff(out.pooled, pooled) <= TOL


@torch.no_grad()
def check_vae(ours, theirs):
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    post, ref = ours.encode(x), theirs.encode(x).latent_dist
    assert maxdiff(post.mean, ref.mean) <= TOL and maxdiff(post.logvar, ref.logvar) <= TOL
    z = post.mean
    assert maxdiff(ours.decode(z), theirs.decode(z).sample) <= TOL
    assert ours.config.scaling_factor == theirs.config.scaling_factor


@torch.no_grad()
def check_unet(ours, theirs, context, pooled=None):
    """Two timesteps, a non-square latent; SDXL gets its pooled text and size/crop ids."""
    g = torch.Generator().manual_seed(4)
    b = context.shape[0]
    x = torch.randn(b, theirs.config.in_channels, 8, 12, generator=g)
    t = torch.tensor([999, 10][:b])
    added = None
    if pooled is not None:
        ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]).repeat(b, 1)
        added = {"text_embeds": pooled, "time_ids": ids}
    want = theirs(x, t, context, added_cond_kwargs=added).sample
    assert maxdiff(ours(x, t, context, added), want) <= TOL


def check_sd(pipe, ref):
    """Every component of a loaded SD / SDXL Pipeline against the diffusers pipeline it was saved from."""
    encoders = [ref.text_encoder] + ([ref.text_encoder_2] if hasattr(ref, "text_encoder_2") else [])
    tokenizers = [ref.tokenizer] + ([ref.tokenizer_2] if hasattr(ref, "tokenizer_2") else [])
    assert len(pipe.text_encoders) == len(pipe.tokenizers) == len(encoders)
    states = []
    for enc, tok, ref_enc, ref_tok in zip(pipe.text_encoders, pipe.tokenizers, encoders, tokenizers):
        ids = check_tokenizer(tok, ref_tok)
        check_clip(enc, ref_enc, ids)
        states.append(enc(ids))
    check_vae(pipe.vae, ref.vae)
    if len(states) == 1:                        # SD1.x / SD2: the last hidden state
        check_unet(pipe.unet, ref.unet, states[0].last_hidden_state)
    else:                                       # SDXL: both penultimate states, bigG's projected pooled
        context = torch.cat([s.penultimate_hidden_state for s in states], dim=-1)
        check_unet(pipe.unet, ref.unet, context, states[1].pooled)


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind, family", [("sd15", "sd15"), ("sd2", "sd2"), ("inpaint", "sd15")])
def test_sd_folder(tmp_path, kind, family):
    ref = make_sd(tmp_path / "pipe", kind)
    pipe = weights.load_pipeline(tmp_path / "pipe")
    assert isinstance(pipe, Pipeline) and pipe.family == family and pipe.transformer is None
    assert pipe.inpainting == (kind == "inpaint") and pipe.unet.config.in_channels == (9 if kind == "inpaint" else 4)
    assert pipe.denoiser is pipe.unet
    check_sd(pipe, ref)
    saved = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert pipe.scheduler_config == saved and pipe.scheduler_config["steps_offset"] == 1
    assert pipe.config["_class_name"] == type(ref).__name__
    assert pipe.tokenizers[0].pad_token_id == (0 if kind == "sd2" else 49407)


def test_sdxl_folder(tmp_path):
    ref = make_sdxl(tmp_path / "pipe")
    pipe = weights.load_pipeline(tmp_path / "pipe")
    assert pipe.family == "sdxl" and not pipe.inpainting
    assert [t.pad_token_id for t in pipe.tokenizers] == [49407, 0]
    assert [e.text_projection is not None for e in pipe.text_encoders] == [False, True]
    check_sd(pipe, ref)
    assert pipe.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025


def test_folder_options(tmp_path):
    """fp16 variant files, dtype, prediction_type and family overrides."""
    ref = make_sd(tmp_path / "pipe")
    ref.to(torch.float16).save_pretrained(tmp_path / "pipe16", variant="fp16")
    pipe = weights.load_pipeline(tmp_path / "pipe16", variant="fp16", dtype=None, prediction_type="v_prediction",
                                 family="sd2")
    assert pipe.family == "sd2" and pipe.scheduler_config["prediction_type"] == "v_prediction"
    for model, theirs in ((pipe.unet, ref.unet), (pipe.vae, ref.vae)):
        got, want = model.state_dict(), theirs.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        # A force_upcast VAE (diffusers' default config) is upcast to fp32 on load (weights/sd.py vae_dtype).
        want_dtype = torch.float32 if getattr(model.config, "force_upcast", False) else torch.float16
        assert all(v.dtype == want_dtype for v in got.values())
    emb = pipe.text_encoders[0].text_model.embeddings.token_embedding.weight
    assert emb.dtype == torch.float16 and torch.equal(emb, ref.text_encoder.get_input_embeddings().weight)
    assert weights.load_pipeline(tmp_path / "pipe", dtype=torch.float16).unet.conv_in.weight.dtype == torch.float16


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart") / "pipe"
    return folder, make_pixart(folder)


def test_pixart_folder(pixart_folder):
    folder, ref = pixart_folder
    pipe = weights.load_pipeline(folder)
    assert pipe.family == "pixart" and pipe.unet is None and pipe.denoiser is pipe.transformer
    assert not pipe.inpainting
    assert len(pipe.text_encoders) == len(pipe.tokenizers) == 1
    tok, t5 = pipe.tokenizers[0], pipe.text_encoders[0]
    assert tok.model_max_length == 120          # PixArt's caption length is the default
    ids = check_tokenizer(tok, ref.tokenizer, length=120)
    mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        context = t5(ids, attention_mask=mask)
        want = ref.text_encoder(ids, attention_mask=mask).last_hidden_state
        assert maxdiff(context, want) <= TOL
        check_vae(pipe.vae, ref.vae)
        x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5))
        t = torch.tensor([999, 10])
        added = {"resolution": torch.tensor([[64.0, 96.0]] * 2), "aspect_ratio": torch.tensor([[64 / 96]] * 2)}
        out = pipe.transformer(x, t, context, context_mask=mask, added_cond=added)
        ref_out = ref.transformer(x, encoder_hidden_states=context, timestep=t, added_cond_kwargs=added,
                                  encoder_attention_mask=mask).sample
        assert maxdiff(out, ref_out) <= TOL
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert pipe.scheduler_config == saved


def test_pixart_folder_without_text_encoder(tmp_path):
    """A PixArt folder with no T5 and no tokenizer (model_index.json says null): empty lists, no error."""
    make_pixart(tmp_path / "pipe", with_text=False)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["text_encoder"][-1] is None and index["tokenizer"][-1] is None
    pipe = weights.load_pipeline(tmp_path / "pipe")
    assert pipe.family == "pixart" and pipe.text_encoders == [] and pipe.tokenizers == []
    assert pipe.transformer is not None and pipe.vae is not None


def test_pixart_tokenizer_without_vocabulary(pixart_folder, tmp_path):
    """A tokenizer/ folder holding only its configs (no spiece.model / tokenizer.json): the tokenizer is left
    out, the T5 kept."""
    folder = tmp_path / "pipe"
    shutil.copytree(pixart_folder[0], folder)
    vocabularies = [folder / "tokenizer" / name for name in ("spiece.model", "tokenizer.json")]
    assert any(p.is_file() for p in vocabularies)
    for p in vocabularies:
        p.unlink(missing_ok=True)
    pipe = weights.load_pipeline(folder)
    assert pipe.tokenizers == [] and len(pipe.text_encoders) == 1


def test_folder_errors(tmp_path, pixart_folder):
    with pytest.raises(CheckpointError, match="pickle"):
        weights.load_pipeline(tmp_path / "model.ckpt")
    (tmp_path / "v1-5-pruned.ckpt").write_bytes(b"\x80\x02}q\x00.")   # a pickle is refused before it is read
    with pytest.raises(CheckpointError, match=r"v1-5-pruned\.ckpt: pickle checkpoints are refused"):
        weights.load_pipeline(tmp_path / "v1-5-pruned.ckpt")
    with pytest.raises(CheckpointError, match="component folder"):
        weights.load_pipeline(pixart_folder[0] / "transformer")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(CheckpointError, match="KandinskyPipeline"):
        weights.load_pipeline(odd)
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                      "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(CheckpointError, match="unet/"):
        weights.load_pipeline(odd)
    with pytest.raises(ValueError, match="unet_config"):
        weights.load_pipeline(pixart_folder[0], unet_config={"norm_num_groups": 8})
    with pytest.raises(ValueError, match="family"):
        weights.load_pipeline(pixart_folder[0], family="sdxl")
    with pytest.raises(ValueError, match="family"):
        weights.load_pipeline(pixart_folder[0], family="sd3")
    with pytest.raises(ValueError, match="prediction_type"):
        weights.load_pipeline(pixart_folder[0], prediction_type="sample")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        weights.load_pipeline(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        weights.load_pipeline(tmp_path / "missing.safetensors")
