"""train.py with test hooks, run in its place (`PYTHONPATH=. python tests/train_faults.py ARGS`,
or under torchrun; tests/train_helpers.py sets the path).

train.py has no test hooks of its own: this wrapper patches its functions (and flash/checkpoint.py's) at
their seams, then calls train.main(). tests/test_train.py uses it to kill a run at chosen moments and to
check that the ranks stay in sync:

    FLASH_TRAIN_FAULT=kill-step:N   SIGKILL in step N, after its micro-batches, before the all-reduce
                      kill-write:N  SIGKILL while the checkpoint taken after N steps is being written
                      kill-swap:N   SIGKILL between the two renames that publish that checkpoint
                      nan:N,M,...   a NaN student loss in steps N, M, ... (before backward)
    --check-sync                    every log.jsonl line gets "rank_hashes": a hash of each rank's trainable
                                    weights after that step's optimiser step, gathered from all ranks
"""
import hashlib
import math
import os
import signal
import sys

import torch
import torch.distributed as tdist

import flash.checkpoint
import train


def armed(kind, step):
    """Is FLASH_TRAIN_FAULT `kind` set for `step`?"""
    name, _, steps = os.environ.get("FLASH_TRAIN_FAULT", "").partition(":")
    return name == kind and str(step) in steps.split(",")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults():
    now = {"step": None, "saving": None}        # the step being trained, the checkpoint being written

    accumulate = train.accumulate

    def accumulate_then_kill(args, m, d, dataset, step, *rest):
        now["step"] = step
        result = accumulate(args, m, d, dataset, step, *rest)
        if armed("kill-step", step):
            die()
        return result
    train.accumulate = accumulate_then_kill

    def poisoned(objective):
        def micro_batch(*a):
            terms, loss, disc = objective(*a)
            return terms, loss * math.nan if armed("nan", now["step"]) else loss, disc
        return micro_batch
    train.flash_micro_batch = poisoned(train.flash_micro_batch)
    train.diffusion_micro_batch = poisoned(train.diffusion_micro_batch)

    save_checkpoint = train.save_checkpoint

    def save_checkpoint_with_kills(out, snapshot, tensors, optimizers, state):
        now["saving"] = state["step"]

        def snapshot_then_kill(folder):
            snapshot(folder)
            if armed("kill-write", state["step"]):
                die()
        save_checkpoint(out, snapshot_then_kill, tensors, optimizers, state)
    train.save_checkpoint = save_checkpoint_with_kills

    retire = flash.checkpoint.retire

    def retire_then_kill(last, old):
        retire(last, old)
        if armed("kill-swap", now["saving"]):
            die()
    flash.checkpoint.retire = retire_then_kill


def rank_hashes(params, d):
    """A 56-bit hash of this rank's tensors, gathered from every rank (all ranks must call it)."""
    h = hashlib.sha256(b"".join(p.detach().cpu().view(torch.uint8).numpy().tobytes() for p in params))
    mine = torch.tensor([int.from_bytes(h.digest()[:7], "little")], device=d.device)
    hashes = [mine.clone() for _ in range(d.world)]
    if d.world > 1:
        tdist.all_gather(hashes, mine)
    return [int(x) for x in hashes]


def install_check_sync():
    log_record = train.log_record

    def log_record_with_hashes(args, m, d, *rest):     # every rank builds the record after the optimiser step
        record = log_record(args, m, d, *rest)
        head = list(m.head.parameters()) if m.head is not None else []
        record["rank_hashes"] = rank_hashes(list(train.trainable(m).values()) + train.text_params(m) + head, d)
        return record
    train.log_record = log_record_with_hashes


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--check-sync" in argv:
        argv.remove("--check-sync")
        install_check_sync()
    install_faults()
    train.main(argv)
