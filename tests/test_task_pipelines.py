"""flash.pipeline.generate on task pipelines (inpaint, upscale, adapter) and their folders (weights/pipeline.py,
weights/save.py), against diffusers' StableDiffusionInpaintPipeline and StableDiffusionAdapterPipeline (the
oracles) on tiny random SD1.5-like pipelines built with tests/test_pipeline.py's helpers (2-level VAE, f = 2;
images 32 x 24, non-square so that a swapped height and width cannot pass).

Inpainting parity covers the order of the generator's draws (initial noise, then the masked-image posterior
sample, then LCM's re-noising) and the condition in both CFG branches; a mask with grey values checks the
binarization. Bound: 2/255 on fp32 images (the acceptance bound); measured in the printed lines (~1e-6).
Super-resolution has no diffusers counterpart: its checks are behavioural (size, determinism, the condition
reaching both CFG branches). Folders: full ones load back here and in diffusers; base-relative ones
(`flash_base`) hold only the task's own component and give the same images.
"""
import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionAdapterPipeline,
                       StableDiffusionInpaintPipeline, T2IAdapter)

import weights
from flash.io import CheckpointError
from flash.pipeline import generate
from flash.unet import UNet2DConditionModel as FlashUNet
from helpers import SD15_SCHEDULER, hf_clip_tokenizer, maxdiff, randomize, tiny_clip, tiny_unet, tiny_vae
from weights.save import save_pipeline

H, W = 32, 24                 # pixels, non-square; the tiny VAEs have f = 2
PROMPTS = ["a photo of a cat", "A red BUS on the Moon, 2024!"]
ACCEPT = 2 / 255
SAMPLERS = {"ddim": (DDIMScheduler, 4, 7.5), "dpm++2m": (DPMSolverMultistepScheduler, 3, 5.0),
            "lcm": (LCMScheduler, 4, 0.0)}
ADAPTER = dict(in_channels=1, channels=[16, 32], num_res_blocks=1, downscale_factor=2, adapter_type="full_adapter")


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def box_masks(n):
    """Masks (n, 1, H, W): a box per image with grey values on both sides of 0.5 (binarized to 1 / 0)."""
    m = torch.zeros(n, 1, H, W)
    for i in range(n):
        m[i, :, 4 + 4 * i:20 + 4 * i, 6:18] = 0.7
        m[i, :, 0:4, :] = 0.3
    return m


def diffusers_pipe(cls, folder, **components):
    """An SD1.5-like diffusers pipeline of class `cls`, saved to `folder` with the released SD1.5 scheduler
    config."""
    pipe = cls(**components, scheduler=DDIMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """{task: (diffusers pipeline or None, our pipeline)}; ours loaded by weights.load_pipeline."""
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    base = dict(vae=tiny_vae(1), text_encoder=tiny_clip(2, 16, eos=49407), tokenizer=hf_clip_tokenizer())   # shared by all
    inpaint = diffusers_pipe(StableDiffusionInpaintPipeline, root / "inpaint", **base,
                             unet=tiny_unet(3, 16, attention_head_dim=2, in_channels=9))
    adapter = diffusers_pipe(StableDiffusionAdapterPipeline, root / "adapter", **base,
                             unet=tiny_unet(4, 16, attention_head_dim=2), adapter=randomize(T2IAdapter(**ADAPTER), 5))
    ours_inpaint, ours_adapter = weights.load_pipeline(root / "inpaint"), weights.load_pipeline(root / "adapter")
    # The upscaler: the same base components, a UNet taking noisy latent 4 + low-res latent 4 channels.
    unet = randomize(FlashUNet(dataclasses.replace(ours_adapter.unet.config, in_channels=8)), 6)
    upscale = dataclasses.replace(ours_adapter, task="upscale", unet=unet, adapter=None)
    text = dataclasses.replace(ours_adapter, task="text-to-image", adapter=None)
    return {"inpaint": (inpaint, ours_inpaint), "adapter": (adapter, ours_adapter), "upscale": (None, upscale),
            "text-to-image": (None, text), "root": root}


def theirs_images(pipe, sampler, seed, **kw):
    cls, steps, guidance = SAMPLERS[sampler]
    pipe.scheduler = cls.from_config(SD15_SCHEDULER)
    with torch.no_grad():
        out = pipe(num_inference_steps=steps, guidance_scale=guidance, height=H, width=W, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(seed), **kw).images
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def ours_images(pipe, sampler, seed, prompts=PROMPTS, **kw):
    _, steps, guidance = SAMPLERS[sampler]
    return generate(pipe, prompts, steps=steps, sampler=sampler, guidance=guidance, seed=seed, progress=False, **kw)


# ------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("sampler,per_prompt", [("ddim", True), ("dpm++2m", False), ("lcm", True)])
def test_inpaint_matches_diffusers(pipes, sampler, per_prompt):
    """One image + mask per prompt, or one pair broadcast to both prompts (DPM++)."""
    theirs, ours = pipes["inpaint"]
    assert ours.task == "inpaint" and ours.inpainting
    n = 2 if per_prompt else 1
    image, mask = rand(n, 3, H, W, seed=1), box_masks(n)
    want = theirs_images(theirs, sampler, 3, prompt=PROMPTS, image=image, mask_image=mask)
    got = ours_images(ours, sampler, 3, image=image, mask=mask)        # height / width from the image
    assert got.shape == want.shape == (2, 3, H, W)
    d = maxdiff(got, want)
    print(f"inpaint {sampler}: max abs diff {d:.2e}")
    assert d < ACCEPT, f"inpaint {sampler}: max abs diff {d}"
    if sampler == "lcm":   # teeth: another mask (binarized differently) changes the images beyond the bound
        other = ours_images(ours, sampler, 3, image=image, mask=(box_masks(n) > 0).float())
        assert maxdiff(other, got) > 3 * ACCEPT


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])
def test_adapter_matches_diffusers(pipes, sampler):
    theirs, ours = pipes["adapter"]
    assert ours.task == "adapter" and ours.adapter is not None
    edges = (rand(2, 1, H, W, seed=2) > 0.7).float()
    want = theirs_images(theirs, sampler, 4, prompt=PROMPTS, image=edges, adapter_conditioning_scale=0.7)
    got = ours_images(ours, sampler, 4, adapter_image=edges, adapter_scale=0.7)
    assert got.shape == want.shape == (2, 3, H, W)
    d = maxdiff(got, want)
    print(f"adapter {sampler}: max abs diff {d:.2e}")
    assert d < ACCEPT, f"adapter {sampler}: max abs diff {d}"
    if sampler == "lcm":   # teeth: the adapter scale matters
        weaker = ours_images(ours, sampler, 4, adapter_image=edges, adapter_scale=0.2)
        assert maxdiff(weaker, got) > 10 * ACCEPT


# ---------------------------------------------------------------------------------------------- upscale

def test_upscale(pipes):
    _, ours = pipes["upscale"]
    kw = dict(steps=2, sampler="lcm", seed=2, progress=False)
    low = rand(2, 3, 16, 16, seed=3)
    a = generate(ours, PROMPTS, image=low, upscale=2, **kw)
    assert a.shape == (2, 3, 32, 32)
    x4 = generate(ours, PROMPTS[:1], image=rand(1, 3, 4, 4), upscale=4, steps=1, progress=False)
    assert x4.shape == (1, 3, 16, 16)
    # Same low-res image -> same output; another one -> another output (the condition is used).
    assert torch.equal(a, generate(ours, PROMPTS, image=low, upscale=2, **kw))
    b = generate(ours, PROMPTS, image=rand(2, 3, 16, 16, seed=4), upscale=2, **kw)
    assert maxdiff(a, b) > 3 * ACCEPT
    # One image broadcast to every prompt == that image given per prompt; batch repeats it per prompt.
    one = generate(ours, PROMPTS, image=low[:1], height=32, width=32, **kw)
    assert maxdiff(one, generate(ours, PROMPTS, image=low[:1].repeat(2, 1, 1, 1), upscale=2, **kw)) < 1e-5
    batched = generate(ours, PROMPTS, image=low[:, :, :8, :8], upscale=2, batch=2, **kw)
    assert batched.shape == (4, 3, 16, 16)
    # Non-square: 16 x 12 -> 32 x 24, the condition upsampled to the output's own height and width.
    wide = generate(ours, PROMPTS, image=low[:, :, :, :12], upscale=2, **kw)
    assert wide.shape == (2, 3, 32, 24)


def test_condition_reaches_both_cfg_branches(pipes):
    """With the negative prompt equal to the prompt, CFG's two rows are the same model call only if the
    image condition is given to the unconditional row too: guided == unguided."""
    for task in ("upscale", "adapter"):
        _, ours = pipes[task]
        kw = ({"image": rand(1, 3, 8, 8, seed=5), "upscale": 2} if task == "upscale"
              else {"adapter_image": (rand(1, 1, H, W, seed=5) > 0.7).float(), "height": H, "width": W})
        run = dict(steps=2, sampler="ddim", seed=6, progress=False, **kw)
        plain = generate(ours, PROMPTS[0], guidance=0.0, **run)
        guided = generate(ours, PROMPTS[0], guidance=6.0, negative_prompt=PROMPTS[0], **run)
        assert maxdiff(plain, guided) < 1e-5, task
        assert maxdiff(plain, generate(ours, PROMPTS[0], guidance=6.0, negative_prompt="x", **run)) > 10 * ACCEPT


# ----------------------------------------------------------------------------------------------- errors

def error(pipe, match, prompts=PROMPTS, **kw):
    with pytest.raises(ValueError, match=match) as e:
        generate(pipe, prompts, steps=1, sampler="ddim", progress=False, **kw)
    assert "\n" not in str(e.value)


def test_errors(pipes):
    img, mask = rand(2, 3, H, W), box_masks(2)
    inpaint, up, adapter, text = (pipes[k][1] for k in ("inpaint", "upscale", "adapter", "text-to-image"))
    error(inpaint, "image: missing; this inpaint pipeline needs image and mask", mask=mask)
    error(inpaint, "mask: missing", image=img)
    error(inpaint, "mask: size 16x16 differs from the image's 32x24", image=img, mask=torch.zeros(1, 1, 16, 16))
    error(inpaint, "image: 1 channels, this inpaint pipeline takes 3", image=img[:, :1], mask=mask)
    error(inpaint, "mask: 3 channels", image=img, mask=img)
    error(inpaint, "image: 3 images for 2 prompts", image=rand(3, 3, H, W), mask=mask)
    error(inpaint, r"image: values must be in \[0, 1\], got \[-1", image=img * 2 - 1, mask=mask)
    error(inpaint, "height/width: 64x24 differs from the image size 32x24", image=img, mask=mask, height=64)
    error(inpaint, "adapter_image: this inpaint pipeline takes no adapter_image", image=img, mask=mask,
          adapter_image=img)
    error(inpaint, r"image: expected a tensor \(N, 3, H, W\)", image=img[0], mask=mask)
    error(text, "mask: this text-to-image pipeline takes no mask \\(only inpaint pipelines do\\)", mask=mask)
    error(text, "image: this text-to-image pipeline takes no image", image=img)
    error(text, "adapter_image: this text-to-image", adapter_image=img[:, :1])
    error(up, "image: missing", upscale=2)
    error(up, "upscale: the factor is required", image=img)
    error(up, "upscale: an integer factor >= 1, got 1.5", image=img, upscale=1.5)
    error(up, "mask: this upscale pipeline takes no mask", image=img, mask=mask, upscale=2)
    error(adapter, "adapter_image: missing", height=H, width=W)
    error(adapter, "adapter_image: 3 channels, this adapter pipeline takes 1", adapter_image=img)
    # The per-task input-channel check: a 9-channel UNet cannot run text-to-image.
    error(dataclasses.replace(inpaint, task="text-to-image"),
          "the denoiser takes 9 input channels; this text-to-image pipeline needs 4", height=H, width=W)
    error(dataclasses.replace(text, task="inpaint"), "needs 9", image=img, mask=mask)


# -------------------------------------------------------------------------------------- load and save

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("task", ["inpaint", "adapter"])
def test_full_folder_loads_back_and_in_diffusers(pipes, task, tmp_path):
    theirs, ours = pipes[task]
    folder = save_pipeline(ours, tmp_path / task)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == type(theirs).__name__ and "flash_base" not in index
    back = weights.load_pipeline(folder)
    assert back.task == task and same_weights(back.unet, ours.unet) and same_weights(back.vae, ours.vae)
    assert (back.adapter is not None) == (task == "adapter")
    if task == "adapter":
        assert same_weights(back.adapter, ours.adapter)
    cls = type(theirs)
    loaded = cls.from_pretrained(folder, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    kw = ({"image": rand(1, 3, H, W, seed=8), "mask": box_masks(1)} if task == "inpaint"
          else {"adapter_image": (rand(2, 1, H, W, seed=8) > 0.7).float(), "height": H, "width": W})
    theirs_kw = ({"image": kw["image"], "mask_image": kw["mask"]} if task == "inpaint"
                 else {"image": kw["adapter_image"]})
    want = theirs_images(loaded, "lcm", 9, prompt=PROMPTS, **theirs_kw)
    got = ours_images(back, "lcm", 9, **kw)
    d = maxdiff(got, want)
    print(f"{task} folder in diffusers, lcm: max abs diff {d:.2e}")
    assert d < ACCEPT


def test_base_relative_folders(pipes, tmp_path):
    """A text-to-image base and three task folders that hold only their own component; moved together
    they still load (the base path is relative) and give the same images as the pipelines saved."""
    text = pipes["text-to-image"][1]
    save_pipeline(text, tmp_path / "models" / "base")
    runs = {"inpaint": {"image": rand(1, 3, H, W, seed=9), "mask": box_masks(1)},
            "upscale": {"image": rand(1, 3, 8, 8, seed=9), "upscale": 2},
            "adapter": {"adapter_image": (rand(1, 1, H, W, seed=9) > 0.7).float(), "height": H, "width": W}}
    own = {"inpaint": "unet", "upscale": "unet", "adapter": "adapter"}
    for task in runs:
        save_pipeline(pipes[task][1], tmp_path / "models" / "tasks" / task, base=tmp_path / "models" / "base")
    shutil.move(tmp_path / "models", tmp_path / "moved")
    for task, kw in runs.items():
        folder = tmp_path / "moved" / "tasks" / task
        assert sorted(p.name for p in folder.iterdir()) == sorted(["model_index.json", own[task]])
        assert json.loads((folder / "model_index.json").read_text())["flash_base"] == "../../base"
        back, ours = weights.load_pipeline(folder), pipes[task][1]
        assert back.task == task and back.family == ours.family
        assert same_weights(back.vae, ours.vae) and same_weights(back.unet, ours.unet)
        assert same_weights(back.text_encoders[0], ours.text_encoders[0])
        assert back.scheduler_config == text.scheduler_config | {"_class_name": back.scheduler_config["_class_name"]}
        run = dict(steps=1, sampler="lcm", seed=1, progress=False, **kw)
        assert torch.equal(generate(back, PROMPTS[:1], **run), generate(ours, PROMPTS[:1], **run)), task


def test_base_errors(pipes, tmp_path):
    ours = pipes["upscale"][1]
    with pytest.raises(ValueError, match="base .* is not a pipeline folder"):
        save_pipeline(ours, tmp_path / "up", base=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="base= is for task pipelines"):
        save_pipeline(pipes["text-to-image"][1], tmp_path / "t", base=tmp_path)
    save_pipeline(pipes["text-to-image"][1], tmp_path / "base")
    folder = save_pipeline(ours, tmp_path / "up", base=tmp_path / "base")
    index = json.loads((folder / "model_index.json").read_text())
    for rel, match in (("../missing", "flash_base '../missing' is not a pipeline folder"),
                       ("../up", "the base has a flash_base of its own")):
        (folder / "model_index.json").write_text(json.dumps(dict(index, flash_base=rel)))
        with pytest.raises(CheckpointError, match=match) as e:
            weights.load_pipeline(folder)
        assert "\n" not in str(e.value)
    (tmp_path / "base" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="flash_base '../base'.*KandinskyPipeline"):
        weights.load_pipeline(folder)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(CheckpointError, match="is not a pipeline folder"):
        weights.load_pipeline(folder)
