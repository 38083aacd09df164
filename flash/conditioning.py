"""What the denoiser is conditioned on while it trains: the keyword dicts passed as `denoiser(x, t, **cond)`.

A conditioning dict holds the text part ({context, context_mask, added_cond: {...}}, by the family's recipe in
flash/pipeline.py) and, for the tasks beyond text-to-image (flash/tasks.py), an image part: `concat` (extra
input channels: a mask and the masked-image latent, or the latent of a downsampled copy) or
`adapter_residuals` (T2I-Adapter features of an edge map). Classifier-free guidance drops the text only: the
unconditional branch keeps the image condition (docs/method.md, "Tasks beyond text-to-image").

Unlike inference (flash.pipeline.generate), training builds these from training images and per-sample random
draws, and may need gradients through the text encoder or the adapter when those are the trained modules.
"""
import torch

from flash.buckets import size_condition
from flash.pipeline import ENCODERS, denoiser_kwargs, encode_prompt
from flash.tasks import downsample, edge_map, encode, inpaint_condition, upsample

IMAGE_KEYS = ("concat", "adapter_residuals")      # the image condition inside a conditioning dict
SIZE_KEYS = ("time_ids", "resolution", "aspect_ratio")   # the size conditioning inside added_cond


def cond_map(fn, *conds):
    """fn over the matching tensors of conditioning dicts {context, context_mask, added_cond: {...},
    concat, adapter_residuals: [...]}."""
    if isinstance(conds[0], dict):
        return {k: cond_map(fn, *(c[k] for c in conds)) for k in conds[0]}
    if isinstance(conds[0], (list, tuple)):
        return [cond_map(fn, *parts) for parts in zip(*conds)]
    return None if conds[0] is None else fn(*conds)


def with_image_condition(uncond, cond):
    """The unconditional branch: the text of `uncond` (expanded to the batch), the image condition of `cond`
    (docs/method.md, "Tasks beyond text-to-image": the condition is present in both CFG branches), and the size
    conditioning of `cond` (SDXL's time ids, PixArt's resolution and aspect ratio: per sample, as diffusers'
    pipelines give both branches the same sizes)."""
    n = cond["context"].shape[0]
    text = cond_map(lambda u: u.expand(n, *u.shape[1:]), uncond)
    if "added_cond" in text:
        text["added_cond"] = {**text["added_cond"], **{k: v for k, v in cond["added_cond"].items() if k in SIZE_KEYS}}
    return {**text, **{k: cond[k] for k in IMAGE_KEYS if k in cond}}


def image_condition(pipe, images, draws, adapter_trainable=False):
    """The task's image condition for a batch of training images in [-1, 1], from their per-sample draws
    (`mask` and `mask_noise` for inpainting, `factor` for super-resolution)."""
    if pipe.task == "inpaint":
        return {"concat": inpaint_condition(pipe.vae, images.float(), draws["mask"], draws["mask_noise"])}
    if pipe.task == "upscale":
        size = images.shape[-1]
        # each image at its own factor, bicubic-upsampled back, then one batched encode
        up = torch.cat([upsample(downsample(img[None].float(), int(f)), size)
                        for img, f in zip(images, draws["factor"])])
        return {"concat": encode(pipe.vae, up)}
    if pipe.task == "adapter":
        with torch.set_grad_enabled(adapter_trainable and torch.is_grad_enabled()):
            return {"adapter_residuals": pipe.adapter(edge_map(images))}
    return {}


def encode_text(pipe, prompts, resolution, unconditional=False, trainable=False):
    """Prompts -> the denoiser's keyword arguments, by the family's recipe (flash.pipeline: SD's CLIP states,
    SDXL's two CLIPs + pooled + size ids, PixArt's T5 + mask). Unconditional: the family's own, "" for SD1.5
    and PixArt, zeros for SDXL (docs/method.md, "One training step", step 1). `trainable`: with grad through
    the text encoder (encode_prompt runs without); SD's unconditional text is then "". `resolution`: the side
    of square images, or a SizeInfo per prompt (flash/buckets.py) for SDXL's and PixArt's size conditioning."""
    if trainable:
        c = ENCODERS[pipe.family](pipe, [""] * len(prompts) if unconditional else list(prompts))
    else:
        cond, uncond = encode_prompt(pipe, list(prompts), guidance=unconditional)
        c = uncond if unconditional else cond
    if isinstance(resolution, int):
        return {"context": c.context, **denoiser_kwargs(pipe, c, resolution, resolution)}
    kw = denoiser_kwargs(pipe, c, *resolution[0].target)
    if "added_cond" in kw:      # SDXL, PixArt 1024-MS: each sample's own sizes
        sizes = size_condition(pipe.family, resolution, c.context.dtype, c.context.device)
        kw["added_cond"] = {**kw["added_cond"], **{k: v for k, v in sizes.items() if k in kw["added_cond"]}}
    return {"context": c.context, **kw}
