"""Data-parallel training without the DDP wrapper: process-group set-up from torchrun's environment and an
explicit gradient all-reduce.

train.py uses one module as student (with grad), teacher, fake score and a frozen feature extractor that
gradients flow through, all in one step; DDP hooks every backward that reaches its parameters and expects
one forward per backward, so it does not fit. Instead every rank starts from rank 0's weights (broadcast)
and, once per optimiser step, the trainable gradients are averaged over the ranks: what DDP computes with
`no_sync` over the accumulation micro-batches.
"""
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    def mean(self, tensor):
        """In place: the mean of `tensor` over the ranks (a no-op in one process)."""
        if self.world > 1:
            tdist.all_reduce(tensor)
            tensor /= self.world
        return tensor


def setup_distributed():
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / PORT (multi-node too); a plain `python`
    run is rank 0 of 1. nccl on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        tdist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, device)


def broadcast(params, d):
    """Every rank starts from rank 0's values."""
    for p in params if d.world > 1 else []:
        tdist.broadcast(p.data, src=0)


def average_gradients(params, d, bucket=1 << 25):
    """What DDP does, once per optimiser step: .grad = mean over ranks, in flat buckets of up to 32M values
    (so a full fine-tune never concatenates all its gradients at once). A parameter without a gradient
    gets zeros, so every rank reduces the same buckets."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    chunks = []
    for p in params:
        if not chunks or sum(q.numel() for q in chunks[-1]) + p.numel() > bucket:
            chunks.append([])
        chunks[-1].append(p)
    for chunk in chunks if d.world > 1 else []:
        flat = d.mean(torch.cat([p.grad.reshape(-1) for p in chunk]))
        for p, g in zip(chunk, flat.split([p.numel() for p in chunk])):
            p.grad.copy_(g.view_as(p))


def barrier(d):
    if d.world > 1:
        tdist.barrier()


def cleanup(d):
    """Leave together, then tear the process group down."""
    if d.world > 1:
        tdist.barrier()
        tdist.destroy_process_group()


def stop_signals():
    """A list that SIGTERM or SIGINT appends to, for a loop to finish its step, save and exit (torchrun
    forwards the signal to every rank; the loop all-reduces the flag). A second signal kills at once."""
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    return stop
