"""flash/pipeline.py against diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline and
PixArtAlphaPipeline (the oracles), end to end: prompt -> tokens -> text states -> sampler -> VAE -> image.

Tiny random pipelines are built and saved by diffusers here, with real tokenizers: the shipped CLIP vocabulary
(weights/clip_vocab) for the SD families, and a small SentencePiece unigram model trained here for PixArt's T5
(no T5 vocabulary exists offline). Our Pipeline is assembled from the saved folders with weights' component
loaders, so these tests do not depend on the pipeline-folder loader. Same seed -> same images: fp32 images must
agree within 2/255 (the acceptance bound) and, tighter, within 1e-4, for DDIM (10 steps, CFG 7.5), Euler and
DPM-Solver++ 2M (CFG 7.5) and LCMScheduler (4 steps, no CFG), images 32 x 24 (non-square, so a swapped height
and width cannot pass).
"""
import functools
import json

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                       PixArtAlphaPipeline, StableDiffusionXLPipeline)

import weights
from flash.pipeline import Conditioning, Pipeline, encode_prompt, generate, schedule_for
from helpers import SD15_SCHEDULER, hf_clip_tokenizer, make_pixart, make_sd15, maxdiff, tiny_clip, tiny_unet, tiny_vae

H, W = 32, 24                 # pixels; the tiny VAEs have 2 levels (f = 2): latents 16 x 12
PROMPTS = ["a photo of a cat", "A red BUS on the Moon, 2024!"]
# fp32 on both sides. Measured: ~1e-6, except DDIM with clip_sample (PixArt's config lacks the key, so DDIM's
# default True applies) at ~4e-5: clipping x0 stops the eps rounding errors from cancelling. Wiring bugs (a
# swapped size id, no lower-casing) give 1e-2 and more.
STRICT = 2e-4
ACCEPT = 2 / 255

# The released SDXL-base-1.0 one (EulerDiscreteScheduler, "leading" spacing, inherited clip_sample false).
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SAMPLERS = {  # flash sampler -> (diffusers scheduler class, steps, guidance)
    "ddim": (DDIMScheduler, 10, 7.5),
    "euler": (EulerDiscreteScheduler, 5, 7.5),
    "dpm++2m": (DPMSolverMultistepScheduler, 6, 7.5),
    "lcm": (LCMScheduler, 4, 0.0),
}


def make_sdxl(folder):
    """SDXL-like: CLIP-L-like (16) ++ bigG-like with projection (24 -> pooled 20), text_time conditioning,
    tokenizer_2 padding with "!", an Euler scheduler config with "leading" spacing as released."""
    unet = tiny_unet(6, 16 + 24, attention_head_dim=(1, 2), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=20 + 6 * 8, transformer_layers_per_block=(1, 2))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(4, scaling_factor=0.13025, force_upcast=True),
                                     text_encoder=tiny_clip(5, 16, eos=49407),
                                     text_encoder_2=tiny_clip(7, 24, projection=20, eos=49407),
                                     tokenizer=hf_clip_tokenizer(), tokenizer_2=hf_clip_tokenizer(pad="!"), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    return pipe


def load_ours(folder, family):
    """Our Pipeline from the saved folder, component by component."""
    encoders = [d for d in ("text_encoder", "text_encoder_2") if (folder / d).is_dir()]
    return Pipeline(
        family=family, vae=weights.load_vae(folder / "vae"),
        text_encoders=[weights.load_text_encoder(folder / d) for d in encoders],
        tokenizers=[weights.load_tokenizer(folder / d.replace("text_encoder", "tokenizer")) for d in encoders],
        scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        unet=weights.load_unet(folder / "unet") if family != "pixart" else None,
        transformer=weights.load_transformer(folder / "transformer") if family == "pixart" else None,
        config=json.loads((folder / "model_index.json").read_text()))


MAKERS = {"sd15": make_sd15, "sdxl": make_sdxl, "pixart": functools.partial(make_pixart, t5_buckets=8)}


@pytest.fixture(scope="module", params=list(MAKERS))
def pipes(request, tmp_path_factory):
    """(family, diffusers pipeline, our pipeline), built once per family."""
    family = request.param
    torch.manual_seed(0)             # the models' own initialisation (randomize() then adds seeded noise)
    folder = tmp_path_factory.mktemp(family) / "pipe"
    theirs = MAKERS[family](folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.saved_scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ours = load_ours(folder, family)
    ours.folder = folder
    return family, theirs, ours


def run_theirs(pipe, scheduler_cls, steps, guidance, seed=0, **kw):
    """diffusers' images, with the sampler set the documented way: `XScheduler.from_config(saved config)`."""
    pipe.scheduler = scheduler_cls.from_config(pipe.saved_scheduler_config)
    # PixArt: no resolution binning (see flash/pipeline.py); clean_caption needs bs4 + ftfy, and without them
    # diffusers falls back to lower() + strip(), which is what flash does.
    extra = {"use_resolution_binning": False, "clean_caption": False} if isinstance(pipe, PixArtAlphaPipeline) else {}
    with torch.no_grad():
        return pipe(num_inference_steps=steps, guidance_scale=guidance, height=H, width=W, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(seed), **extra, **kw).images


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_same_images_as_diffusers(pipes, sampler):
    family, theirs, ours = pipes
    scheduler_cls, steps, guidance = SAMPLERS[sampler]
    want = run_theirs(theirs, scheduler_cls, steps, guidance, seed=3, prompt=PROMPTS)
    got = generate(ours, PROMPTS, steps=steps, sampler=sampler, guidance=guidance, height=H, width=W, seed=3,
                   progress=False)
    assert got.shape == want.shape == (2, 3, H, W)
    d = maxdiff(got, want)
    print(f"{family} {sampler}: max abs diff {d:.2e}")
    assert d < ACCEPT and d < STRICT, f"{family} {sampler}: max abs diff {d}"
    # The comparison has teeth: the two prompts, and another seed, give visibly different images.
    assert maxdiff(got[0], got[1]) > 20 * STRICT
    other = generate(ours, PROMPTS[:1], steps=steps, sampler=sampler, guidance=guidance, height=H, width=W,
                     seed=4, progress=False)
    assert maxdiff(other[0], got[0]) > 20 * STRICT


def test_batch_and_negative_prompt(pipes):
    """num_images_per_prompt order (p0, p0, p1, p1) and an explicit negative prompt (SDXL: no zeroing)."""
    family, theirs, ours = pipes
    want = run_theirs(theirs, DDIMScheduler, 3, 5.0, seed=7, prompt=PROMPTS, num_images_per_prompt=2,
                      negative_prompt=["blurry"] * 2)
    got = generate(ours, PROMPTS, steps=3, sampler="ddim", guidance=5.0, height=H, width=W, seed=7,
                   negative_prompt="blurry", batch=2, progress=False)
    assert got.shape == (4, 3, H, W)
    assert maxdiff(got, want) < STRICT


def test_encode_prompt_matches_diffusers(pipes):
    family, theirs, ours = pipes
    cond, uncond = encode_prompt(ours, PROMPTS)
    with torch.no_grad():
        if family == "sd15":
            c, u = theirs.encode_prompt(PROMPTS, "cpu", 1, True)
            pairs = [(cond.context, c), (uncond.context, u)]
        elif family == "sdxl":
            c, u, pc, pu = theirs.encode_prompt(PROMPTS, device="cpu")
            pairs = [(cond.context, c), (uncond.context, u), (cond.pooled, pc), (uncond.pooled, pu)]
            assert not uncond.context.any() and not uncond.pooled.any()   # force_zeros_for_empty_prompt
        else:
            c, cm, u, um = theirs.encode_prompt(PROMPTS, device="cpu")
            pairs = [(cond.context, c), (uncond.context, u), (cond.mask, cm), (uncond.mask, um)]
            assert cond.context.shape[1] == 120 and uncond.mask.sum(1).tolist() == [1, 1]   # "" -> </s>
    for ours_t, theirs_t in pairs:
        assert ours_t.shape == theirs_t.shape
        assert maxdiff(ours_t.float(), theirs_t.float()) < 1e-5


def test_prompt_embeds_path(pipes):
    """Precomputed embeddings (diffusers' prompt_embeds / negative_prompt_embeds) give the same images."""
    family, theirs, ours = pipes
    cond, uncond = encode_prompt(ours, PROMPTS, negative="ugly")
    kw = {"prompt_embeds": cond.context, "negative_prompt_embeds": uncond.context}
    if family == "sdxl":
        kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    if family == "pixart":
        kw.update(prompt_attention_mask=cond.mask, negative_prompt_attention_mask=uncond.mask, negative_prompt=None)
    want = run_theirs(theirs, DPMSolverMultistepScheduler, 3, 4.0, seed=11, **kw)
    got = generate(ours, steps=3, sampler="dpm++2m", guidance=4.0, height=H, width=W, seed=11,
                   prompt_embeds=cond, negative_embeds=uncond, progress=False)
    assert maxdiff(got, want) < STRICT


def test_sdxl_time_ids_and_flash_sampler(pipes):
    """SDXL's time ids carry the size as (height, width); PixArt's resolution likewise. The Flash sampler
    (trained timesteps [999, 749, 499, 249]) runs without CFG and is deterministic per seed."""
    family, theirs, ours = pipes
    a = generate(ours, PROMPTS[:1], steps=4, sampler="flash", height=H, width=W, seed=5, progress=False)
    b = generate(ours, PROMPTS[:1], steps=4, sampler="flash", height=H, width=W, seed=5, progress=False)
    assert torch.equal(a, b) and a.shape == (1, 3, H, W) and 0 <= a.min() and a.max() <= 1
    if family == "sd15":
        return
    from flash.pipeline import denoiser_kwargs
    kw = denoiser_kwargs(ours, Conditioning(torch.zeros(1, 3, 8)), H, W)
    if family == "sdxl":
        assert kw["added_cond"]["time_ids"].tolist() == [[H, W, 0, 0, H, W]]
    else:
        assert kw["added_cond"]["resolution"].tolist() == [[H, W]]
        assert kw["added_cond"]["aspect_ratio"].item() == pytest.approx(H / W)


def test_bad_arguments(pipes):
    family, _, ours = pipes
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(ours, "x", steps=1, height=20, width=W, progress=False)
    with pytest.raises(ValueError, match="steps"):
        generate(ours, "x", steps=0, height=H, width=W, progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(ours, "x", steps=1, sampler="heun", height=H, width=W, progress=False)
    with pytest.raises(ValueError, match="negative prompts"):
        encode_prompt(ours, PROMPTS, negative=["a", "b", "c"])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("config", [SD15_SCHEDULER, SDXL_SCHEDULER, dict(DPMSolverMultistepScheduler(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear").config)], ids=["pndm", "euler", "dpm"])
def test_schedule_for_takes_the_sampler_class_defaults(sampler, config):
    """A key missing from the pipeline's scheduler config takes the default of the class that runs it."""
    ref = SAMPLERS[sampler][0].from_config(config).config
    ours = schedule_for(sampler, {k: v for k, v in config.items() if k not in ref.get("_use_default_values", [])})
    if sampler != "lcm":              # LCMScheduler ignores timestep_spacing
        assert ours.timestep_spacing == ref.timestep_spacing
    for key in ("clip_sample", "set_alpha_to_one", "steps_offset", "beta_schedule", "prediction_type"):
        if key in ref:
            assert getattr(ours, key) == ref[key], key


def test_load_pipeline_gives_the_same_images(pipes):
    """weights.load_pipeline(folder) (family detection, model_index.json as config) == the component build."""
    family, _, ours = pipes
    loaded = weights.load_pipeline(ours.folder)
    assert loaded.family == family and loaded.config.get("_class_name") == ours.config["_class_name"]
    kw = dict(steps=2, sampler="ddim", guidance=3.0, height=H, width=W, seed=1, progress=False)
    assert torch.equal(generate(loaded, PROMPTS, **kw), generate(ours, PROMPTS, **kw))
