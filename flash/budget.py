"""Memory bounds of generation: how big an image may be, how many images go through the denoiser and the
VAE at once, and a rough estimate of the memory a call needs, refused before anything is allocated.

- Image sides are capped at MAX_SIDE_FACTOR x the model's trained side (2048 px for SD1.5, 4096 for SDXL,
  128 for the digits): far beyond that a UNet or DiT draws repeated tiles, and the activations grow with
  the square of the side.
- The denoiser runs on chunks of at most `denoise_chunk(h, w)` images (MAX_CHUNK, fewer for big images:
  DENOISE_PIXELS pixels per chunk); the VAE decodes `decode_chunk(h, w)` images at once (DECODE_PIXELS).
  Both depend on the image size only, never on the machine, so a seed gives the same images everywhere;
  a call of one chunk draws exactly what diffusers draws (sample.py's runs on the digits always do).
- `check_memory` compares a rough peak (activations of one chunk, kept images) with the memory free for
  the process (free GPU memory; on the CPU MemAvailable and the address-space limit, `ulimit -v`) and
  refuses a call that cannot fit, in one line, instead of letting the kernel's OOM killer end it.
"""
import resource

import torch

MAX_SIDE_FACTOR = 4
MAX_CHUNK = 256                      # images per denoiser chunk: small images (the digits) go in one chunk
DENOISE_PIXELS = 16 * 512 * 512      # SD1.5 at 512 px: 16 images a chunk; SDXL at 1024 px: 4
DECODE_PIXELS = 4 * 512 * 512        # the VAE decoder's full-resolution activations dominate: 4 at 512 px


def max_side(pipe):
    return MAX_SIDE_FACTOR * pipe.default_size


def denoise_chunk(height, width):
    return max(1, min(MAX_CHUNK, DENOISE_PIXELS // (height * width)))


def decode_chunk(height, width):
    return max(1, DECODE_PIXELS // (height * width))


def estimate_bytes(pipe, images, height, width, guided, kept=4):
    """A rough peak of generate(): the denoiser's activations for one chunk (about 24 tensors of its widest
    first level, at the latent size, twice with CFG), the VAE decoder's for one decode chunk (about 6 fp32
    tensors of its widest level at its resolution) and the finished images (`kept` bytes a value: 4 for
    fp32 images, 1 for sample.py's uint8 grid)."""
    f = pipe.vae_scale_factor
    latent = (height // f) * (width // f)
    element = torch.finfo(pipe.dtype).bits // 8
    config = pipe.denoiser.config
    width0 = getattr(config, "block_out_channels", None) or (config.num_attention_heads * config.attention_head_dim,)
    chunk = min(images, denoise_chunk(height, width))
    denoiser = 24 * width0[0] * latent * element * chunk * (2 if guided else 1)
    levels = pipe.vae.config.block_out_channels    # the decoder runs them reversed: widest at the lowest res
    widest = max(c * height * width // 4 ** (len(levels) - 1 - i) for i, c in enumerate(reversed(levels)))
    decoder = 6 * widest * 4 * min(images, decode_chunk(height, width))
    return denoiser + decoder + images * 3 * height * width * kept


def available_bytes(device):
    """Memory this process may still take on `device`, or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * resource.getpagesize()
            free = min(free, max(0, soft - used))
    except (OSError, StopIteration, ValueError):
        pass
    return free


def check_memory(pipe, images, height, width, guided, kept=4):
    """Refuse (one-line ValueError) a generate call whose estimated peak exceeds the free memory."""
    need = estimate_bytes(pipe, images, height, width, guided, kept)
    free = available_bytes(pipe.device)
    if free is not None and need > free:
        raise ValueError(f"{images} image{'s' * (images > 1)} of {width}x{height} need about {need / 2**30:.1f} GiB "
                         f"of memory, {free / 2**30:.1f} GiB is free on {pipe.device}: ask for fewer or smaller "
                         "images")
