"""The start of each task teacher of recipes/digits_tasks.sh: the text-to-image digits teacher, widened for
an image condition, saved as a pipeline folder that train.py fine-tunes.

    python recipes/digits_tasks_init.py --base runs/digits/teacher2/final --task inpaint --out runs/digits-tasks/inpaint/init

- inpaint / upscale: the teacher's UNet with conv_in widened from 4 to 9 (mask 1 + masked-image latent 4) or
  8 (low-res latent 4) input channels; the new input weights start at zero, so the widened UNet computes
  exactly the text-to-image teacher until fine-tuning teaches it to read the condition (how SD's inpainting
  model was started from SD: its 5 extra channels were zero-initialised).
- adapter: the teacher's UNet unchanged plus a new T2I-Adapter for 1-channel edge maps, one feature per UNet
  level (widths = the UNet's block_out_channels, downscale_factor = the VAE's 4, so its first feature has the
  latent's size). conv_in's weights and every bias start at zero, so all features are exactly zero and the
  pipeline again starts as the text-to-image teacher (the zero-initialised output of ControlNet, Zhang et al.
  2023, applied to the adapter); the gradient reaches conv_in through the residual blocks' identity paths.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.adapter import AdapterConfig, T2IAdapter  # noqa: E402
from flash.tasks import extra_channels  # noqa: E402
from flash.unet import UNet2DConditionModel  # noqa: E402
from weights import load_pipeline  # noqa: E402
from weights.save import save_pipeline  # noqa: E402

TASKS = ("inpaint", "upscale", "adapter")


def widen(unet, extra):
    """A copy of `unet` with `extra` zero-initialised input channels after the latent's."""
    cfg = dataclasses.replace(unet.config, in_channels=unet.config.in_channels + extra)
    wide = UNet2DConditionModel(cfg)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide.eval()


def new_adapter(unet, vae_factor, seed):
    torch.manual_seed(seed)
    adapter = T2IAdapter(AdapterConfig(in_channels=1, channels=tuple(unet.config.block_out_channels),
                                       num_res_blocks=2, downscale_factor=vae_factor))
    with torch.no_grad():
        adapter.adapter.conv_in.weight.zero_()
        for name, p in adapter.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return adapter.eval()


def build(base, task, seed=0):
    pipe = load_pipeline(base)
    if pipe.task != "text-to-image" or pipe.unet is None:
        raise ValueError(f"--base {base}: needs a text-to-image SD-layout pipeline, got a {pipe.task} one")
    if task == "adapter":
        pipe.adapter = new_adapter(pipe.unet, pipe.vae_scale_factor, seed)
    else:
        pipe.unet = widen(pipe.unet, extra_channels(task, pipe.vae.config.latent_channels))
    pipe.task = task
    return pipe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the text-to-image teacher pipeline folder")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation")
    args = p.parse_args(argv)
    pipe = build(args.base, args.task, args.seed)
    save_pipeline(pipe, args.out)
    part = pipe.adapter if args.task == "adapter" else pipe.unet
    print(f"wrote {args.out} ({args.task}: {'adapter' if args.task == 'adapter' else 'unet'} "
          f"{sum(p.numel() for p in part.parameters()):,d} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
