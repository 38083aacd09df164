"""The SD3 family end to end against diffusers' StableDiffusion3Pipeline (the oracle): folder loading
(weights.load_pipeline), prompt encoding (flash/sd3.py), the rectified-flow samplers (flash/flow.py) and
sample.py --sampler euler.

Tiny random SD3 pipelines are built and saved by diffusers here, with and without T5 (text_encoder_3 =
None, as the authors' Flash SD3 recipe): CLIP-L-like (16 wide, projection 12) and bigG-like (24 wide,
projection 20) text towers over the shipped CLIP vocabulary, a 48-wide T5 over a small SentencePiece model
trained here, a 2-block MMDiT, and a 2-level VAE with 16 latent channels, shift_factor and no quant convs.
Images are 32 x 24 and 24 x 32 pixels (latents 16 x 12: non-square both ways).
"""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from transformers import T5Config, T5EncoderModel

import sample
import weights
from flash.flow import FlowSchedule, flash_sigmas, sample_flow
from flash.io import CheckpointError
from flash.pipeline import encode_prompt, generate
from helpers import hf_clip_tokenizer, hf_t5_tokenizer, maxdiff, randomize, tiny_clip

PROMPTS = ["a photo of a cat", "A red BUS on the Moon, 2024!"]
NEGATIVE = "blurry painting"
STRICT = 1e-4          # fp32 on both sides; measured ~1e-6
ACCEPT = 2 / 255       # the acceptance bound, through the 8-bit PNG


def make_sd3(folder, with_t5=True):
    """A tiny StableDiffusion3Pipeline saved to `folder` (see the module docstring)."""
    torch.manual_seed(0)
    tok3 = t5 = None
    if with_t5:
        tok3 = hf_t5_tokenizer(folder.parent)
        t5 = randomize(T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=48, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=2, feed_forward_proj="gated-gelu")), 8)
    transformer = randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=12, qk_norm="rms_norm", dual_attention_layers=(0,)), 9)
    vae = randomize(AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16, norm_num_groups=8,
        sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
        use_post_quant_conv=False), 10)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=tiny_clip(5, 16, projection=12, eos=49407), tokenizer=hf_clip_tokenizer(),
        text_encoder_2=tiny_clip(7, 24, projection=20, eos=49407), tokenizer_2=hf_clip_tokenizer(pad="!"),
        text_encoder_3=t5, tokenizer_3=tok3)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["t5", "no-t5"])
def pipes(request, tmp_path_factory):
    """(diffusers pipeline, our pipeline from weights.load_pipeline, folder), built once each."""
    folder = tmp_path_factory.mktemp(request.param) / "sd3"
    theirs = make_sd3(folder, with_t5=request.param == "t5")
    return theirs, weights.load_pipeline(folder), folder


def run_theirs(pipe, steps, guidance, seed, height=32, width=24, **kw):
    with torch.no_grad():
        return pipe(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                    output_type="pt", generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def test_folder_loads_as_sd3(pipes):
    theirs, ours, _ = pipes
    assert ours.family == "sd3" and ours.unet is None
    assert len(ours.text_encoders) == len(ours.tokenizers) == (3 if theirs.text_encoder_3 is not None else 2)
    assert ours.vae.quant_conv is None and ours.vae.post_quant_conv is None
    assert ours.vae.config.shift_factor == pytest.approx(0.0609) and ours.vae.config.latent_channels == 16
    assert ours.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_encode_prompt_matches_diffusers(pipes):
    """Embeddings and pooled vectors, for the prompts and a negative prompt, with and without T5."""
    theirs, ours, _ = pipes
    cond, uncond = encode_prompt(ours, PROMPTS, negative=NEGATIVE)
    with torch.no_grad():
        c, u, pc, pu = theirs.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=NEGATIVE)
    assert cond.context.shape == (2, 77 + 256, 48) and cond.pooled.shape == (2, 32)
    for got, want in ((cond.context, c), (uncond.context, u), (cond.pooled, pc), (uncond.pooled, pu)):
        print(f"encode_prompt {tuple(got.shape)}: max abs diff {maxdiff(got, want):.2e}")
        assert got.shape == want.shape
        assert maxdiff(got, want) < 1e-6
    t5_part = cond.context[:, 77:]
    assert (t5_part.abs().sum() > 0) == (theirs.text_encoder_3 is not None)   # zeros without T5
    assert not cond.context[:, :77, 40:].any()                                # CLIP states zero-padded 40 -> 48
    assert maxdiff(cond.context[0], cond.context[1]) > 1e-2 and maxdiff(cond.pooled, uncond.pooled) > 1e-2


@pytest.mark.parametrize("height, width", [(32, 24), (24, 32)])
def test_same_images_as_diffusers(pipes, height, width):
    """Flow Euler, 5 steps, CFG 7 with a negative prompt, non-square: generate() within 1e-4."""
    theirs, ours, _ = pipes
    want = run_theirs(theirs, 5, 7.0, seed=3, height=height, width=width, prompt=PROMPTS,
                      negative_prompt=NEGATIVE)
    got = generate(ours, PROMPTS, steps=5, sampler="euler", guidance=7.0, height=height, width=width, seed=3,
                   negative_prompt=NEGATIVE, progress=False)
    assert got.shape == want.shape == (2, 3, height, width)
    d = maxdiff(got, want)
    print(f"sd3 euler {height}x{width}: max abs diff {d:.2e}")
    assert d < STRICT, d
    # The comparison has teeth: the two prompts, and another seed, give visibly different images.
    assert maxdiff(got[0], got[1]) > 20 * STRICT
    other = generate(ours, PROMPTS[:1], steps=5, sampler="euler", guidance=7.0, height=height, width=width,
                     seed=4, negative_prompt=NEGATIVE, progress=False)
    assert maxdiff(other[0], got[0]) > 20 * STRICT


def test_sample_cli_euler_matches_diffusers(pipes, tmp_path):
    """sample.py --sampler euler with --negative-prompt, --guidance, --height/--width, --seed: the PNG is
    diffusers' image within 2/255."""
    theirs, _, folder = pipes
    out = tmp_path / "x.png"
    assert sample.main(["--model", str(folder), "--prompt", PROMPTS[1], "--negative-prompt", NEGATIVE,
                        "--sampler", "euler", "--steps", "4", "--guidance", "6", "--seed", "9", "--height", "24",
                        "--width", "32", "--out", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    got = torch.from_numpy(np.asarray(Image.open(out)).astype(np.float32) / 255).permute(2, 0, 1)
    want = run_theirs(theirs, 4, 6.0, seed=9, height=24, width=32, prompt=PROMPTS[1], negative_prompt=NEGATIVE)[0]
    assert got.shape == want.shape == (3, 24, 32)
    print(f"sample.py --sampler euler PNG: max abs diff {maxdiff(got, want) * 255:.2f}/255")
    assert maxdiff(got, want) <= ACCEPT
    assert maxdiff(got, want) < maxdiff(got, want.flip(-1))       # and the comparison can fail


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_sigmas_match_flow_match_euler(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    schedule = FlowSchedule(shift=shift)
    sigmas = schedule.sigmas(steps)
    assert torch.equal(sigmas, ref.sigmas)
    assert [schedule.timestep(s) for s in sigmas[:-1]] == ref.timesteps.tolist()


def test_flash_sampler_timesteps_and_step():
    """The student's timesteps are indices 0, 8, 16, 24 of the 32-step teacher grid; each step predicts x0 =
    x - sigma v and re-noises it: with an exact velocity field for a fixed x0, the sampler returns x0."""
    schedule = FlowSchedule(shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(32)
    assert torch.equal(flash_sigmas(schedule, 4)[:-1], ref.sigmas[[0, 8, 16, 24]])
    assert flash_sigmas(schedule, 1).tolist() == [1.0, 0.0]
    x0 = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def exact(x, t):        # v = (x - x0) / sigma: the true velocity towards this x0
        calls.append(t)
        return (x - x0) / (t / 1000)
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sample_flow("flash", exact, noise, 4, schedule, torch.Generator().manual_seed(2))
    assert maxdiff(out, x0) < 1e-5 and len(calls) == 4 and calls[0] == 1000.0
    # Re-noising draws fresh noise from the generator: another generator seed changes the path, not x0 here.
    euler = sample_flow("euler", exact, noise, 4, schedule)
    assert maxdiff(euler, x0) < 1e-4


def test_flash_sampler_through_generate(pipes):
    """--sampler flash on a flow model: no CFG by default, deterministic per seed, differs from Euler."""
    _, ours, _ = pipes
    a = generate(ours, PROMPTS[:1], steps=4, sampler="flash", height=32, width=24, seed=5, progress=False)
    b = generate(ours, PROMPTS[:1], steps=4, sampler="flash", height=32, width=24, seed=5, progress=False)
    c = generate(ours, PROMPTS[:1], steps=4, sampler="euler", guidance=0, height=32, width=24, seed=5,
                 progress=False)
    assert torch.equal(a, b) and maxdiff(a, c) > 1e-3


def test_unsupported_samplers_and_scheduler_fields(pipes, tmp_path, capsys):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="not available for a flow model"):
        generate(ours, "x", steps=2, sampler="ddim", height=32, width=24, progress=False)
    config = {**ours.scheduler_config, "use_dynamic_shifting": True}
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowSchedule.from_config(config)
    for key, value in (("use_karras_sigmas", True), ("shift_terminal", 0.02), ("invert_sigmas", True)):
        with pytest.raises(ValueError, match=key):
            FlowSchedule.from_config({**ours.scheduler_config, key: value})
    # Through sample.py: one line on stderr, exit 2.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in folder.iterdir():
        (broken / item.name).symlink_to(item)
    (broken / "scheduler").unlink()
    (broken / "scheduler").mkdir()
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    code = sample.main(["--model", str(broken), "--prompt", "x", "--sampler", "euler", "--steps", "1",
                        "--height", "32", "--width", "24", "--out", str(tmp_path / "y.png"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "use_dynamic_shifting" in err[0]


def test_loading_errors_are_one_line(pipes, tmp_path):
    """A missing transformer/ folder, and a config value the MMDiT does not support, each named."""
    _, _, folder = pipes
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in folder.iterdir():
        if item.name != "transformer":
            (broken / item.name).symlink_to(item)
    with pytest.raises(CheckpointError, match="transformer/") as e:
        weights.load_pipeline(broken)
    assert "\n" not in str(e.value)
    (broken / "transformer").mkdir()
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps({**config, "qk_norm": "layer_norm"}))
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(
        folder / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="qk_norm") as e:
        weights.load_pipeline(broken)
    assert "\n" not in str(e.value)
