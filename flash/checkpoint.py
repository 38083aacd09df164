"""Training checkpoints: written so that a kill at any moment leaves one complete, and read back for --resume.

A checkpoint folder OUT/checkpoint-last/ holds
- the snapshot: what sample.py and diffusers load (a LoRA file, or a component folder), written by a callable
  the caller passes, since only the caller knows the format;
- exact tensors as safetensors files (e.g. the raw LoRA factors, the discriminator head): the snapshot may be
  rescaled (diffusers' LoRA format folds alpha / rank into B) and a resume must be bit-exact;
- resume.pt: the optimiser states and the global RNG states (the project's own file, read with
  weights_only=True, so it can hold tensors and plain containers only);
- state.json: step, phase, the run's config, whatever the caller puts there.

Publishing: everything goes into OUT/.checkpoint-tmp/, is fsynced (power loss, not only a kill), then two
renames swap it in: checkpoint-last -> checkpoint-old, .checkpoint-tmp -> checkpoint-last. Killed between the
two, the run still has checkpoint-old, which `find_checkpoint` falls back to.
"""
import json
import os
import shutil
from pathlib import Path

import torch

from flash.io import CheckpointError, read_safetensors, write_safetensors


def save_checkpoint(out, snapshot, tensors, optimizers, state):
    """OUT/checkpoint-last/ <- snapshot(folder), `tensors` {file name: state dict}, the optimisers
    {name: optimiser} and RNG states (resume.pt), and `state` (state.json)."""
    out = Path(out)
    tmp = out / ".checkpoint-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    snapshot(tmp)
    for name, state_dict in tensors.items():
        write_safetensors(state_dict, tmp / name)
    # A training loop that draws all its randomness from seeded generators needs none of these; kept anyway.
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng}, tmp / "resume.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.rglob("*"):            # on disk before it is published
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    publish(tmp, out)


def publish(tmp, out):
    """The two renames: at every moment checkpoint-last or checkpoint-old is complete."""
    last, old = out / "checkpoint-last", out / "checkpoint-old"
    if last.exists():
        retire(last, old)
    os.replace(tmp, last)
    shutil.rmtree(old, ignore_errors=True)


def retire(last, old):
    """The previous checkpoint becomes checkpoint-old (replacing an older one left by a kill)."""
    shutil.rmtree(old, ignore_errors=True)
    os.replace(last, old)


def find_checkpoint(out, resume):
    """The folder to resume from: `resume` is a checkpoint folder, or "auto" for OUT/checkpoint-last (or
    OUT/checkpoint-old when the run was killed between the two renames of a save)."""
    path = Path(out) / "checkpoint-last" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.is_dir():
        path = path.parent / "checkpoint-old"
    if not (path / "state.json").is_file():
        where = path if resume != "auto" else path.parent / "checkpoint-last"
        raise ValueError(f"--resume: no checkpoint in {where}")
    return path


def load_checkpoint(path, tensors, optimizers, device):
    """Restore in place: `tensors` {file name: {name: tensor to overwrite}}, each file holding exactly those
    names; the optimisers' states; the global RNG states. Returns the saved state (state.json)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    for name, targets in tensors.items():
        saved = read_safetensors(path / name)
        if set(saved) != set(targets):
            raise CheckpointError(f"{path / name}: its tensors are not this model's trainable parameters "
                                  f"(other --lora-* ?)")
        with torch.no_grad():
            for n, t in targets.items():
                t.copy_(saved[n])
    resume = torch.load(path / "resume.pt", map_location=device, weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(resume["optimizers"][k])
    torch.set_rng_state(resume["rng"]["torch"].cpu())
    if "cuda" in resume["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(resume["rng"]["cuda"].cpu())
    return state
