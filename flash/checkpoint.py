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
two, the run still has checkpoint-old, which `find_checkpoint` falls back to. OUT/final/ is swapped in whole
the same way (`publish_folder`), and every file is written atomically (flash/io.py).

Reading back (`load_checkpoint`) trusts nothing: state.json must be the JSON this module writes, every saved
tensor must have the name, shape and dtype of the run's, resume.pt must load and fit the optimisers, and a
run of another model (family, task) or objective is refused. Each failure is one line naming the file.

The run folder OUT itself (`check_out`, before any work): a fresh run needs an empty or new folder, a
resumed one a folder holding only what train.py writes; a folder inside a model folder is never used.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from flash.io import CheckpointError, atomic_path, read_json, read_safetensors, write_safetensors, write_text

# What train.py writes in OUT: files, folders (and the temporary names of its atomic writes: ".NAME.*.tmp").
RUN_FILES = {"log.jsonl", "config.json"}
RUN_FOLDERS = {"checkpoint-last", "checkpoint-old", ".checkpoint-tmp", "samples", "final", ".final-tmp", ".final-old"}
# Settings a resumed run may change without a word (the others: a warning), and those that make it another run.
RESUME_FREE = ("steps", "resume", "out", "sample_every", "checkpoint_every", "sample_prompts")
RESUME_FIXED = ("family", "task", "objective", "full_finetune")


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
    with atomic_path(tmp / "resume.pt") as f:
        torch.save({"optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng}, f)
    write_text(json.dumps(state, indent=2), tmp / "state.json")    # ASCII: a path in the config may be any bytes
    fsync_tree(tmp)
    publish(tmp, out)


def fsync_tree(folder):
    """Every file of `folder` on disk (power loss, not only a kill) before the folder is published."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def publish(tmp, out):
    """The two renames: at every moment checkpoint-last or checkpoint-old is complete."""
    last, old = out / "checkpoint-last", out / "checkpoint-old"
    if last.exists():
        retire(last, old)
    os.replace(tmp, last)
    shutil.rmtree(old, ignore_errors=True)


def publish_folder(dest, write):
    """`write(folder)` into a temporary folder beside `dest`, then swapped in by renames: `dest` is at every
    moment the previous complete folder or the new one (or, killed between the two renames, absent with the
    previous one kept as .NAME-old)."""
    dest = Path(dest)
    tmp, old = dest.with_name(f".{dest.name}-tmp"), dest.with_name(f".{dest.name}-old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    if dest.exists():
        retire(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def retire(last, old):
    """The previous checkpoint becomes checkpoint-old (replacing an older one left by a kill)."""
    shutil.rmtree(old, ignore_errors=True)
    os.replace(last, old)


def model_folder_above(path):
    """The pipeline folder (model_index.json) or component folder (config.json beside weights) that holds
    `path` or is `path`, or None."""
    for folder in [path, *path.parents]:
        if (folder / "model_index.json").is_file():
            return folder
        weights = (w for pattern in ("diffusion_pytorch_model*", "model*.safetensors*") for w in folder.glob(pattern))
        if (folder / "config.json").is_file() and any(weights):
            return folder
    return None


def check_out(out, resume):
    """--out before any work, as a one-line ValueError: not a folder (or under a file), inside a model folder,
    holding anything but a training run, or holding a run without --resume (which would overwrite it).
    Returns the checkpoint to resume from (`find_checkpoint`) or None."""
    out = Path(out)
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as e:        # a symlink loop
        raise ValueError(f"--out {out}: {e}") from None
    model = model_folder_above(resolved)
    if model is not None:
        where = "a model folder" if model == resolved else f"inside the model folder {model}"
        raise ValueError(f"--out {out} is {where}; a run never writes into a model: choose an empty folder")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):   # read-only, or a read-only disk
        raise ValueError(f"--out {out}: {existing} is not writable")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    foreign = [p.name for p in entries if not (p.name in RUN_FILES and p.is_file() or p.name in RUN_FOLDERS
                                               and p.is_dir() or p.name.startswith(".") and p.name.endswith(".tmp"))]
    if foreign:
        raise ValueError(f"--out {out} holds files that are not a training run's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): choose an empty folder")
    if resume:
        return find_checkpoint(out, resume)
    if entries:
        raise ValueError(f"--out {out} holds a training run already: use --resume, or choose an empty folder")
    return None


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


def start_log(out, start, config, dataset):
    """Rank 0's run files before the first step: OUT/config.json (the run's settings, and what the data scan
    skipped, flash/data.py), the scan's warnings printed, and OUT/log.jsonl opened for appending. A resumed
    run keeps the log lines of the steps before `start` (rewritten atomically; a line torn by a kill is
    dropped), a fresh one starts an empty log."""
    out = Path(out)
    skipped = getattr(dataset, "skipped", [])
    scan = {"images": len(dataset), "skipped": len(skipped),   # (file, reason) in a folder, (shard, member, reason) in shards
            "first_skipped": [f"{'/'.join(map(str, e[:-1]))}: {e[-1]}" for e in skipped[:20]]}
    write_text(json.dumps({**config, "data_scan": scan}, indent=2) + "\n", out / "config.json")   # ASCII: any path
    for line in getattr(dataset, "warnings", []):
        print(f"train.py: warning: {line}".encode("utf-8", "backslashreplace").decode(), file=sys.stderr)
    log = out / "log.jsonl"
    with atomic_path(log) as tmp, open(tmp, "w", encoding="utf-8") as kept:
        if start and log.is_file():
            with open(log, encoding="utf-8", errors="replace") as f:
                kept.writelines(line for line in f if logged_step(line) < start)
    return open(log, "a", encoding="utf-8")


def logged_step(line):
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) and line.endswith("\n") else float("inf")
    except (ValueError, KeyError, TypeError):
        return float("inf")


def config_changes(saved, current, path):
    """The settings of a resumed run that differ from its checkpoint's (state.json "config"): refused when
    they make it another run (RESUME_FIXED: another model family or task, objective, full / LoRA), else
    returned for a warning."""
    changed = [k for k, v in saved.items() if k not in RESUME_FREE and k in current
               and json.dumps(v) != json.dumps(current[k])]
    fixed = [f"{k} {saved[k]!r} there, {current[k]!r} here" for k in changed if k in RESUME_FIXED]
    if fixed:
        raise CheckpointError(f"{path}: a checkpoint of another run ({'; '.join(fixed)}); resume it with its own "
                              f"--model and settings, or start a new run in an empty --out")
    return changed


def read_state(path):
    """state.json, refused (naming it) unless it holds what `save_checkpoint` writes."""
    state = read_json(path, "checkpoint state")
    ok = isinstance(state, dict) and isinstance(state.get("config"), dict) and all(
        isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
        for k in ("step", "nonfinite_streak"))
    if not ok:
        raise CheckpointError(f"{path}: not a checkpoint state (an object with a step, nonfinite_streak and config)")
    return state


def restore_tensors(file, targets):
    """Copy the tensors of `file` into `targets` {name: tensor}: the names, shapes and dtypes must be equal."""
    saved = read_safetensors(file)
    if set(saved) != set(targets):
        extra, missing = sorted(set(saved) - set(targets)), sorted(set(targets) - set(saved))
        raise CheckpointError(f"{file}: its tensors are not this run's trainable parameters ({len(missing)} missing, "
                              f"e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}; other --lora-targets?)")
    wrong = [f"{n} {tuple(saved[n].shape)} {str(saved[n].dtype)[6:]} in the file, {tuple(t.shape)} "
             f"{str(t.dtype)[6:]} here" for n, t in targets.items()
             if saved[n].shape != t.shape or saved[n].dtype != t.dtype]
    if wrong:
        raise CheckpointError(f"{file}: {len(wrong)} tensors do not fit this run (other --lora-rank, --resolution?), "
                              f"e.g. {wrong[0]}")
    with torch.no_grad():
        for n, t in targets.items():
            t.copy_(saved[n])


def restore_resume_pt(file, optimizers, device):
    """resume.pt (weights_only: no code runs): the optimiser states, checked against the parameters (AdamW's
    moments have their parameter's shape), and the RNG states."""
    try:
        resume = torch.load(file, map_location=device, weights_only=True)
        for k, o in optimizers.items():
            o.load_state_dict(resume["optimizers"][k])
            for group in o.param_groups:
                for p in group["params"]:
                    for name, v in o.state.get(p, {}).items():
                        if torch.is_tensor(v) and v.ndim and v.shape != p.shape:
                            raise ValueError(f"{k} optimiser {name} {tuple(v.shape)} vs parameter {tuple(p.shape)}")
        torch.set_rng_state(resume["rng"]["torch"].cpu())
        if "cuda" in resume["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(resume["rng"]["cuda"].cpu())
    except Exception as e:      # noqa: BLE001 (a truncated zip, a pickle refused, a wrong structure: all one line)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{file}: not this run's resume state (truncated or corrupt?): "
                              f"{type(e).__name__}{': ' + first if first else ''}") from None


def load_checkpoint(path, tensors, optimizers, device, config=None):
    """Restore in place: `tensors` {file name: {name: tensor to overwrite}}, each file holding exactly those
    names with the same shapes and dtypes; the optimisers' states; the global RNG states. `config` (the run's
    settings) is checked against the saved one (`config_changes`). Returns (the saved state, the changed
    settings)."""
    path = Path(path)
    state = read_state(path / "state.json")
    changed = config_changes(state["config"], config or {}, path / "state.json")
    for name, targets in tensors.items():
        restore_tensors(path / name, targets)
    restore_resume_pt(path / "resume.pt", optimizers, device)
    return state, changed
