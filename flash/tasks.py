"""Image conditions of the tasks beyond text-to-image, built the same way by the trainer, the pipeline and
eval.py. The paper (Sec. 4.4) distils inpainting, super-resolution and adapter-conditioned models with the
text-to-image recipe unchanged: the condition enters the denoiser, and is given to both CFG branches;
only the text is dropped for the unconditional one.

    task          what the denoiser gets beside (x_t, t, text)                        UNet in_channels
    inpaint       concat [mask at latent size (1), latent of image * (1 - mask) (C)]  C + 1 + C  (SD: 9)
    upscale       concat [latent of the low-res image, bicubic-upsampled (C)]         C + C
    adapter       adapter_residuals = T2IAdapter(edge map), added to the down path    C

Inpainting is SD's 9-channel layout (masked pixels zeroed before encoding, mask resized with nearest).
Super-resolution is conditioned on a LATENT of the bicubic-upsampled low-res image, so one model serves any
factor (2x and 4x here); SD's x4 upscaler instead concatenates the low-res pixels themselves, which only fits
a factor equal to the VAE's. The adapter is a T2I-Adapter on an edge map (the Flash reference's canny-adapter
recipe; a Sobel edge map here, Canny's non-maximum suppression and hysteresis add nothing on 32 px digits).

Every mask / image here: (B, c, H, W); images in [-1, 1] as the VAE takes them; masks 1 = repaint.
"""
import torch
import torch.nn.functional as F

from flash.schedule import randn

TASKS = ("text-to-image", "inpaint", "upscale", "adapter")
UPSCALE_FACTORS = (2, 4)


def extra_channels(task, latent_channels):
    """Channels the task concatenates to the noisy latent."""
    return {"inpaint": 1 + latent_channels, "upscale": latent_channels}.get(task, 0)


# -- inpainting ------------------------------------------------------------------------------------------

def random_masks(n, size, generator, full_prob=0.1):
    """Training / evaluation masks (n, 1, size, size): one random axis-aligned box per image whose sides are
    30-70% of the image's, or, with probability full_prob, the whole image (so the model also draws from
    nothing, as SD's inpainting model was trained with fully masked images)."""
    masks = torch.zeros(n, 1, size, size)
    for k in range(n):
        full, h, w, top, left = torch.rand(5, generator=generator).tolist()
        if full < full_prob:
            masks[k] = 1
            continue
        h, w = round(size * (0.3 + 0.4 * h)), round(size * (0.3 + 0.4 * w))
        top, left = round((size - h) * top), round((size - w) * left)
        masks[k, :, top:top + h, left:left + w] = 1
    return masks


def binarize_mask(mask):
    """A mask in [0, 1] -> {0, 1} at 0.5 (diffusers' mask processor)."""
    return (mask >= 0.5).to(mask.dtype)


def inpaint_condition(vae, images, mask, noise=None, generator=None):
    """SD's 9-channel inpainting input, without the noisy latent: [mask resized (nearest) to the latent,
    scaled latent of images * (mask < 0.5)]. The masked image is encoded to a posterior SAMPLE, from `noise`
    (B, C, h, w) or else drawn from `generator` (diffusers draws it after the initial latents)."""
    masked = images * (mask < 0.5)
    z = encode(vae, masked, noise, generator)
    small = F.interpolate(mask.to(z.dtype), size=z.shape[-2:])          # default mode: nearest
    return torch.cat([small, z], dim=1)


# -- super-resolution ------------------------------------------------------------------------------------

def downsample(images, factor):
    """The low-resolution input: area downsampling (the mean of each factor x factor block)."""
    return F.avg_pool2d(images, factor) if factor > 1 else images


def upsample(low, size):
    """Bicubic upsampling of the low-resolution image to size (an int: square, or (height, width)), clamped
    to [-1, 1]."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def upscale_condition(vae, low, size):
    """The scaled posterior mean of the bicubic-upsampled low-res image at size (int or (height, width))."""
    return encode(vae, upsample(low, size))


# -- adapter ---------------------------------------------------------------------------------------------

def edge_map(images, threshold=0.25):
    """Edges of images in [-1, 1]: Sobel gradient magnitude of the grey image in [0, 1], thresholded
    -> (B, 1, H, W) in {0, 1}, white edges on black, as the T2I canny adapters take them."""
    grey = (images.float().mean(dim=1, keepdim=True) + 1) / 2
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 4
    k = torch.stack([kx, kx.T])[:, None]                                       # (2, 1, 3, 3)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k)
    return (g.square().sum(dim=1, keepdim=True).sqrt() > threshold).float()


def edge_agreement(edges, reference, tolerance=0):
    """F1 score of two binary edge maps (B, 1, H, W) per image: (B,) in [0, 1]. An edge pixel counts as
    matched when the other map has an edge within `tolerance` pixels (0: the same pixel). On centred 32 px
    digits a tolerance of one pixel already gives 0.85 to unrelated pairs, exact pixels 0.59: read the score
    against the text-only (adapter off) row of the same table."""
    near = (lambda e: F.max_pool2d(e, 2 * tolerance + 1, 1, tolerance)) if tolerance else (lambda e: e)
    tp_p = (edges * near(reference)).flatten(1).sum(1)
    tp_r = (reference * near(edges)).flatten(1).sum(1)
    precision = tp_p / edges.flatten(1).sum(1).clamp(min=1)
    recall = tp_r / reference.flatten(1).sum(1).clamp(min=1)
    return 2 * precision * recall / (precision + recall).clamp(min=1e-8)


# -- demo inputs -----------------------------------------------------------------------------------------

def task_inputs(task, images, generator=None, factor=2):
    """For images in [-1, 1] (e.g. held-out digits): the `flash.pipeline.generate` keyword arguments of the
    task's input made from them (a random box mask, the image downsampled by `factor`, its edge map), and a
    picture of that input (B, 3, H, W) in [0, 1] (the hole in grey, the low-res image, the edges)."""
    x = (images.float() + 1) / 2
    if task == "inpaint":
        mask = random_masks(len(images), images.shape[-1], generator, full_prob=0.0).to(x.device)
        return {"image": x, "mask": mask}, x * (1 - mask) + 0.5 * mask
    if task == "upscale":
        low = (downsample(images.float(), factor) + 1) / 2
        return {"image": low, "upscale": factor}, F.interpolate(low, scale_factor=factor, mode="nearest")
    if task == "adapter":
        edges = edge_map(images)
        return {"adapter_image": edges}, edges.expand(-1, 3, -1, -1)
    return {}, None


# -- shared ----------------------------------------------------------------------------------------------

@torch.no_grad()
def encode(vae, images, noise=None, generator=None):
    """Scaled VAE latent of images in [-1, 1], in fp32: the posterior mean, or a sample (mean + std * noise,
    noise given or drawn from generator in the VAE's dtype, as diffusers' DiagonalGaussian.sample)."""
    dtype = next(vae.parameters()).dtype
    post = vae.encode(images.to(dtype))
    if noise is None and generator is not None:
        noise = randn(post.mean.shape, generator, post.mean.device, post.mean.dtype)
    z = post.mean if noise is None else post.mean + post.std * noise.to(post.mean)
    return vae.scale_latents(z.float())


# -- the tasks' image inputs, checked and turned into denoiser kwargs (flash/pipeline.py's generate) ----------------------------------------------------

# What each task takes besides the prompts; `upscale` is the factor that sets the output size.
TASK_INPUTS = {"text-to-image": (), "inpaint": ("image", "mask"), "upscale": ("image", "upscale"),
               "adapter": ("adapter_image",)}
TAKEN_BY = {"image": "inpaint and upscale pipelines", "mask": "inpaint pipelines", "upscale": "upscale pipelines",
            "adapter_image": "adapter pipelines"}


def each_tensor(v, f):
    """f applied to a condition tensor, or to each tensor of a list (adapter features)."""
    return [f(x) for x in v] if isinstance(v, (list, tuple)) else f(v)


def _size(x):
    return f"{x.shape[-2]}x{x.shape[-1]}"


def _check_image(name, x, channels, task, n):
    """x: a float tensor (1 or n, channels, H, W) in [0, 1]."""
    if not torch.is_tensor(x) or x.dim() != 4:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor (N, {channels}, H, W) in [0, 1], got {got}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: {x.shape[1]} channels, this {task} pipeline takes {channels}")
    if x.shape[0] not in (1, n):
        raise ValueError(f"{name}: {x.shape[0]} images for {n} prompts (give 1, or one per prompt)")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"{name}: values must be in [0, 1], got [{lo:.3g}, {hi:.3g}]")


def task_size(pipe, n, height=None, width=None, image=None, mask=None, upscale=None, adapter_image=None):
    """Check the image conditions that pipe.task takes (n prompts) -> the output (height, width):
    the condition image's size (inpaint, adapter) or the low-res size x upscale, else height / width."""
    task = pipe.task
    if task not in TASKS:
        raise ValueError(f"pipe.task {task!r} is not one of {', '.join(TASKS)}")
    given = {"image": image, "mask": mask, "upscale": upscale, "adapter_image": adapter_image}
    for name, value in given.items():
        if value is not None and name not in TASK_INPUTS[task]:
            raise ValueError(f"{name}: this {task} pipeline takes no {name} (only {TAKEN_BY[name]} do)")
    if task == "text-to-image":
        return height, width
    if pipe.unet is None:
        raise ValueError(f"task {task!r} needs a UNet pipeline; this {pipe.family} pipeline has none")
    needed = [k for k in TASK_INPUTS[task] if k != "upscale"]
    for name in needed:
        if given[name] is None:
            raise ValueError(f"{name}: missing; this {task} pipeline needs {' and '.join(needed)}")

    rgb = getattr(pipe.vae.config, "in_channels", 3)
    if task == "adapter":
        if pipe.adapter is None:
            raise ValueError("adapter_image: this adapter pipeline has no adapter (pipe.adapter is None)")
        _check_image("adapter_image", adapter_image, pipe.adapter.config.in_channels, task, n)
        size, what = tuple(adapter_image.shape[-2:]), "adapter_image"
    else:
        _check_image("image", image, rgb, task, n)
        size, what = tuple(image.shape[-2:]), "image"
    if task == "inpaint":
        _check_image("mask", mask, 1, task, n)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask: size {_size(mask)} differs from the image's {_size(image)}")
    if task == "upscale":
        if upscale is None and (height is None or width is None):
            raise ValueError("upscale: the factor is required (or give both height and width)")
        if upscale is None:
            size = (height, width)
        elif isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
            raise ValueError(f"upscale: an integer factor >= 1, got {upscale!r}")
        else:
            size, what = (size[0] * upscale, size[1] * upscale), f"low-res image ({_size(image)}) x {upscale}"
    asked = (height or size[0], width or size[1])
    if asked != size:
        raise ValueError(f"height/width: {asked[0]}x{asked[1]} differs from the {what} size {size[0]}x{size[1]}")
    return size


@torch.no_grad()
def task_condition(pipe, height, width, image=None, mask=None, adapter_image=None, adapter_scale=1.0,
                   generator=None):
    """The denoiser kwargs of pipe.task for the given condition images in [0, 1] (checked by task_size):
    {"concat": (N, extra, h, w)} or {"adapter_residuals": [features]} ({} for text-to-image), N = the
    number of images given. Inpainting draws its masked-image latent sample from `generator`."""
    vae_device = next(pipe.vae.parameters()).device
    if pipe.task == "inpaint":
        n = max(image.shape[0], mask.shape[0])          # one image with one mask per prompt, or vice versa
        image = image.expand(n, -1, -1, -1).to(vae_device, torch.float32) * 2 - 1
        mask = binarize_mask(mask.expand(n, -1, -1, -1).to(vae_device, torch.float32))
        return {"concat": inpaint_condition(pipe.vae, image, mask, generator=generator)}
    if pipe.task == "upscale":
        return {"concat": upscale_condition(pipe.vae, image.to(vae_device, torch.float32) * 2 - 1,
                                                  (height, width))}
    if pipe.task == "adapter":
        device = next(pipe.adapter.parameters()).device
        return {"adapter_residuals": pipe.adapter(adapter_image.to(device), adapter_scale)}
    return {}
