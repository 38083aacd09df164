"""Train the digit classifier behind prompt accuracy and write weights/digit_classifier.safetensors.

    python recipes/train_digit_classifier.py            # about 1-2 minutes on one CPU core

`flash.metrics.DigitClassifier` trained on the 4,500 `Digits("train")` images (fixed seed, one thread, so
a rerun on the same machine writes the same file), with small random affine jitter (rotation, scale,
shift) because it will judge generated digits, which are less centred than MNIST's. It prints the held-out
accuracy on the 500 `Digits("test")` images; tests/test_metrics.py guards that number.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flash.data import Digits  # noqa: E402
from flash.io import write_safetensors  # noqa: E402
from flash.metrics import CLASSIFIER_FILE, DigitClassifier, classify_digits  # noqa: E402


def jitter(x, generator):
    """Random rotation (+-12 degrees), scale (0.9-1.1) and shift (+-2 px of 32) per image; background -1."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 16)  # grid units: 2 px of a 32-px image
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x + 1 with zero padding, so the area moved in from outside is background (-1 after the shift back).
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def main(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed)
    train, test = Digits("train"), Digits("test")
    model = DigitClassifier()
    print(f"DigitClassifier: {sum(p.numel() for p in model.parameters()):,} parameters")
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(jitter(train.images[idx], generator)), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        acc = (classify_digits(test.images, model) == test.labels).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {total / len(train):.4f}  held-out accuracy {acc:.4f}  "
              f"{time.time() - start:.0f} s")
    train_acc = (classify_digits(train.images, model) == train.labels).float().mean().item()
    print(f"final: train accuracy {train_acc:.4f}, held-out accuracy {acc:.4f} ({int(round(acc * len(test)))}"
          f"/{len(test)}), {time.time() - start:.0f} s")
    write_safetensors(model.state_dict(), args.out, metadata={
        "held_out_accuracy": f"{acc:.4f}", "seed": str(args.seed), "epochs": str(args.epochs)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CLASSIFIER_FILE)
    main(p.parse_args())
