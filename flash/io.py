"""Safetensors I/O shared by every loader: find a component's weight files, read them (sharded or not,
fp16 variants), refuse pickles, and load a state dict into a model built on the meta device. Also every
write of the project (safetensors, JSON, text, PNG: atomically) and its bounded reads of text and JSON.

Loading never holds two copies of the weights: the model is built on the meta device (no storage), and
`load_state_dict(assign=True)` makes the tensors read from the file the model's parameters.
"""
import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded. The message is one line and names the file or keys."""


def refuse_pickle(path):
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); convert it to safetensors "
            f"first (safetensors.torch.save_file(state_dict, ...) as model.safetensors in a transformers folder, "
            f"diffusion_pytorch_model.safetensors in a diffusers one)")


def read_safetensors(path, device="cpu"):
    """One .safetensors file -> dict of tensors. A truncated or corrupt file raises CheckpointError."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {first}") from None


# ------------------------------------------------------------------------------------------ atomic writes

@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; when the block ends without an exception the finished file is
    renamed over `path` (readable by all: mkstemp creates files 0600), else removed. A crash or a full disk
    mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(state_dict, path, metadata=None):
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)


def write_text(text, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def to_uint8(images):
    """Float images (..., 3, H, W) in [0, 1] -> uint8 numpy (..., H, W, 3), rounded half to even."""
    x = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def write_png(image, path, pnginfo=None):
    """A PIL image or a uint8 (H, W[, C]) array -> a PNG at `path`, atomically (atomic_path)."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)


def write_json(obj, path, indent=2, sort_keys=True):
    """Keys sorted as diffusers writes them (pass sort_keys=False to keep a vocabulary's id order)."""
    write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n", path)


# ------------------------------------------------------------------------------------------ bounded reads

MAX_TEXT_BYTES = 64 << 20     # configs, vocabularies, captions, prompt files: far above any real one


def read_bytes(path, what="file", limit=MAX_TEXT_BYTES):
    """A regular file's bytes, refused in one line (ValueError naming it) when it is missing, not a regular
    file (a device, a FIFO, a folder: /dev/zero would never end), or over `limit` bytes."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ValueError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: {what} is not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{path}: {what} is {st.st_size:,} bytes, over the {limit:,}-byte limit")
    with open(path, "rb") as f:
        data = f.read(limit + 1)          # the size can change between stat and read
    if len(data) > limit:
        raise ValueError(f"{path}: {what} is over the {limit:,}-byte limit")
    return data


def read_text(path, what="file", limit=MAX_TEXT_BYTES):
    """read_bytes, decoded: also refused when it is not UTF-8."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def read_json(path, what="JSON file", limit=MAX_TEXT_BYTES):
    """read_text, parsed; a syntax error is one line naming the file, the line and the column."""
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:      # a 5000-digit number, arrays nested 10^6 deep
        raise ValueError(f"{path}: {what} is not usable JSON ({type(e).__name__})") from None


def cached_features(path, key, compute, field="key"):
    """Features kept in a safetensors file (one tensor, "features"): read back from `path` when its metadata
    `field` equals `key` (a digest of the inputs), else `compute()`d and written there atomically under that
    key. An unreadable or stale file is recomputed, never trusted."""
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get(field) == key:
                return f.get_tensor("features")
    except (OSError, SafetensorError):
        pass
    features = compute()
    write_safetensors({"features": features}, path, metadata={field: key})
    return features


def find_weights(folder, stem, variant=None):
    """The weight file (or shard index) of a component folder.

    `stem` is "model" (transformers) or "diffusion_pytorch_model" (diffusers). Looks for
    `<stem>.safetensors`, then the sharded `<stem>.safetensors.index.json`, then the fp16 variants
    (`<stem>.fp16.safetensors`, `<stem>.safetensors.index.fp16.json`). `variant="fp16"` prefers those.
    A folder that holds only pickle weights is refused with a message that says how to convert.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    plain = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    fp16 = [f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json", f"{stem}.fp16.safetensors.index.json"]
    for name in (fp16 + plain) if variant == "fp16" else (plain + fp16):
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or sharded index / fp16 variant) in this folder")


def read_weights(path):
    """A .safetensors file or a shard index (.json) -> one state dict."""
    path = Path(path)
    if path.suffix != ".json":
        return read_safetensors(path)
    try:
        index = read_json(path, "shard index")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: not a valid shard index (needs a \"weight_map\" object of key -> shard file)")
    state = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:       # shards lie beside their index, never elsewhere
            raise CheckpointError(f"{path}: shard {shard!r} is not a file name in the index's folder")
        part = read_safetensors(path.parent / shard)
        state.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} keys listed in the index are absent from their shards, "
                              f"e.g. {', '.join(missing[:3])}")
    return state


def read_config(folder, name="config.json"):
    """A component's config (or model_index.json): a JSON object, bounded (read_json), else CheckpointError."""
    path = Path(folder) / name
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a model folder needs its {name})")
    try:
        config = read_json(path, name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object ({{...}}), got a {type(config).__name__}")
    return config


def _examples(keys, n=3):
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(model, state_dict, source="checkpoint"):
    """Raise one CheckpointError naming missing, unexpected and wrong-shape keys (a few of each, with counts)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    shapes = [f"{k} {tuple(state_dict[k].shape)} in file vs {tuple(s)} in model"
              for k, s in sorted(expected.items()) if k in state_dict and tuple(state_dict[k].shape) != tuple(s)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_examples(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_examples(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} wrong-shape keys: {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def load_into(model, state_dict, source="checkpoint", dtype=torch.float32):
    """Load `state_dict` into `model` (usually built under `torch.device("meta")`) by assignment.

    Floating tensors are cast to `dtype` (None keeps the file's dtype). Modules may define
    `init_buffers()` to compute non-persistent buffers that a meta build left empty.
    """
    check_state_dict(model, state_dict, source)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors of {type(model).__name__} were never loaded: {_examples(left)}")
    return model.eval()
