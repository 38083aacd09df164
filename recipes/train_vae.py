"""The `vae` stage of recipes/digits.sh: train a pipeline's autoencoder on the data, then set its latent
scale. One process, no resume (a few minutes on CPU):

    python recipes/train_vae.py --model runs/digits/init --data digits --out runs/digits/vae [options]

The objective is L1 + L2 reconstruction of a posterior sample plus a weak KL term (`vae_loss`). LDM's VAEs
add LPIPS and a patch GAN; on 32x32 digits plain pixel losses give sharp enough strokes. Only the VAE trains;
the rest of the pipeline is saved back unchanged, with the VAE's config.json scaling_factor set to 1 / std
of the encoded training latents (how SD's 0.18215 was found), so that the diffusion model trained next sees
unit-variance latents. Randomness follows train.py's rule (flash/seeds.py): batch s is positions
s*b .. s*b + b - 1 of the seeded sample stream, its posterior noise is drawn from (seed, s).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.cli import Parser  # noqa: E402
from flash.data import DIGITS_FILE, load_batch, training_set  # noqa: E402
from flash.io import write_json, write_png  # noqa: E402
from flash.seeds import GRID, SAMPLE, generator  # noqa: E402
from weights import load_pipeline  # noqa: E402
from weights.save import save_pipeline  # noqa: E402


def parse_args(argv=None):
    p = Parser(prefix="train_vae.py: ", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", required=True, help="pipeline folder whose VAE trains (e.g. recipes/digits_init.py's)")
    a("--data", required=True, help="folder of images (with captions, unused here), or 'digits'")
    a("--out", default="runs/vae", help="log.jsonl, samples/, final/ (the pipeline with the trained VAE)")
    a("--resolution", type=int, help="image side (default: the pipeline's default size)")
    a("--steps", type=int, default=10000, help="optimiser steps (batches)")
    a("--batch-size", type=int, default=4)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    a("--seed", type=int, default=0)
    a("--kl-weight", type=float, default=1e-4, help="weight of the per-element KL term")
    args = p.parse_args(argv)
    for k in ("steps", "batch_size", "lr", "resolution"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive")
    if args.data != "digits" and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder (or use digits)")
    if args.data == "digits" and not DIGITS_FILE.is_file():
        p.error(f"--data digits: no {DIGITS_FILE}; run flash.data fetch")
    return args


def vae_loss(vae, images, noise, kl_weight):
    """L1 + L2 reconstruction of a posterior sample plus kl_weight * KL(q(z|x) || N(0, I)), all per-element
    means; a weak KL keeps the latent smooth without blurring the reconstructions.
    Returns ({term: value}, loss, reconstruction)."""
    post = vae.encode(images)
    recon = vae.decode(post.mean + post.std * noise)
    l1, l2 = (recon - images).abs().mean(), F.mse_loss(recon, images)
    kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).mean()
    return {"l1": l1, "l2": l2, "kl": kl}, l1 + l2 + kl_weight * kl, recon


@torch.no_grad()
def latent_scale(vae, dataset, seed, count=2000, batch=250):
    """1 / std of posterior samples of `count` training images: the scaling_factor that gives the diffusion
    model unit-variance latents."""
    zs = []
    for first in range(0, min(count, len(dataset)), batch):
        images, _ = load_batch(dataset, seed, range(first, first + batch))
        zs.append(vae.encode(images).sample(generator(seed, GRID, first)))
    return 1.0 / torch.cat(zs).float().std().item()


def train_vae(args):
    """Train the pipeline's AutoencoderKL on the data, then save the pipeline with the new VAE and scale."""
    try:
        pipe = load_pipeline(args.model)
        args.resolution = args.resolution or pipe.default_size
        dataset = training_set(args.data, args.resolution)
    except (ValueError, OSError) as e:      # a bad --model or --data: one line, no traceback
        print(f"train_vae.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    vae, out = pipe.vae.float().train().requires_grad_(True), Path(args.out)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    write_json(vars(args), out / "config.json", sort_keys=False)
    f = pipe.vae_scale_factor
    with open(out / "log.jsonl", "w") as log:
        for step in tqdm(range(args.steps), dynamic_ncols=True):
            images, _ = load_batch(dataset, args.seed, range(step * args.batch_size, (step + 1) * args.batch_size))
            noise = torch.randn((len(images), vae.config.latent_channels, args.resolution // f,
                                 args.resolution // f), generator=generator(args.seed, SAMPLE, step))
            terms, loss, recon = vae_loss(vae, images, noise, args.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), args.clip_grad)
            opt.step()
            log.write(json.dumps({"step": step, "lr": args.lr, "loss": loss.item(),
                                  **{k: v.item() for k, v in terms.items()}}) + "\n")
    vae.eval().requires_grad_(False)
    vae.config.scaling_factor = latent_scale(vae, dataset, args.seed)
    print(f"train_vae.py: scaling_factor = {vae.config.scaling_factor:.5f}", file=sys.stderr)
    pairs = torch.cat([images[:8], recon[:8].detach().clamp(-1, 1)], dim=2)      # originals over reconstructions
    grid = (torch.cat(list(pairs), dim=2).permute(1, 2, 0).numpy() + 1) * 127.5
    write_png(grid.round().astype(np.uint8), out / "samples" / f"step-{args.steps:07d}.png")
    save_pipeline(pipe, out / "final")


def main(argv=None):
    train_vae(parse_args(argv))


if __name__ == "__main__":
    main()
