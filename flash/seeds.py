"""Randomness as a function of integer keys: every draw of a training run comes from a fresh generator seeded
by (seed, tag, index), never from a stream carried from one call to the next.

So a run can stop anywhere and redraw exactly the same numbers on resume, and N processes can each draw
their own share of a batch and together get what one process would. The tags keep the streams apart: the
draws a step shares (grid index, guidance), a sample's own draws (noises, timesteps, masks), an epoch's
order and a dataset item (flash/data.py, the sample stream), the sample grid's noise.
"""
import numpy as np
import torch

STEP, SAMPLE, EPOCH, ITEM, GRID = range(1, 6)      # stream tags mixed into the seeds


def seed_for(*keys):
    """A 64-bit seed from integer keys; numpy's SeedSequence hashes them, so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def generator(*keys):
    return torch.Generator().manual_seed(seed_for(*keys))
