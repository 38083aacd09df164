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
