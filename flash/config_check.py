"""Field-by-field checks of the configs read from JSON (a UNet's, VAE's, PixArt transformer's, CLIP or T5
text encoder's, CLIP image tower's, T2I-Adapter's config.json, a scheduler_config.json), run before
anything is built.

A config file is input like any other: a zero, a negative, a string or a billion where a width belongs
would otherwise end in a ZeroDivisionError, an IndexError, C++ stack frames, or a model build that never
ends (`layers_per_block: 10000000`). Each known field must have the type of its dataclass field (an int
field takes an int, not 2.0 or true; a float field any finite number; a per-level field one value or a
non-empty list) and lie in a range far wider than any released model's (BOUNDS). The relations between
fields (channels divisible by groups and heads, one entry per level) stay with each config's own checks.
"""
import math
import types
from dataclasses import fields

MAX_WIDTH = 1 << 16     # channels and hidden sizes; the widest released layer (T5-XXL's d_ff) is 10240
MAX_DEPTH = 64          # blocks per resolution level; SDXL's deepest level has 10 transformer blocks
MAX_LAYERS = 256        # layers of a transformer tower; ViT-g has 40, T5-XXL 24
MAX_LEVELS = 8          # resolution levels (entries of block_out_channels); the released models have 3 or 4

_WIDTH, _DEPTH, _HEADS = (1, MAX_WIDTH), (1, MAX_DEPTH), (1, 1024)
BOUNDS = {
    **dict.fromkeys(("in_channels", "out_channels", "block_out_channels", "latent_channels", "cross_attention_dim",
                     "hidden_size", "intermediate_size", "d_model", "d_kv", "d_ff", "projection_dim",
                     "caption_channels", "channels", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim"), _WIDTH),
    **dict.fromkeys(("layers_per_block", "num_res_blocks", "transformer_layers_per_block"), _DEPTH),
    **dict.fromkeys(("num_hidden_layers", "num_layers"), (1, MAX_LAYERS)),
    # attention_head_dim counts heads in a UNet config and is a head's width in PixArt's: both well below this
    **dict.fromkeys(("attention_head_dim", "num_attention_heads", "num_heads", "norm_num_groups"), _HEADS),
    "sample_size": (1, 1 << 15), "image_size": (1, 1 << 15), "patch_size": (1, 64), "downscale_factor": (1, 64),
    "downsample_padding": (0, 8), "freq_shift": (0, MAX_WIDTH), "vocab_size": (1, 1 << 22),
    "eos_token_id": (0, 1 << 22), "max_position_embeddings": (1, MAX_WIDTH),
    "relative_attention_num_buckets": (1, 4096), "relative_attention_max_distance": (1, MAX_WIDTH),
    "num_train_timesteps": (2, 100_000), "steps_offset": (0, 1000),
    # floats
    **dict.fromkeys(("norm_eps", "layer_norm_eps", "layer_norm_epsilon"), (0.0, 1.0)),
    "scaling_factor": (1e-6, 1e6), "interpolation_scale": (1e-6, 1e6), "beta_start": (0.0, 1.0),
    "beta_end": (0.0, 1.0),
}
FLOAT_BOUNDS = (-1e6, 1e6)      # any other float field


def _kinds(f):
    """The Python types a dataclass field accepts, from its annotation (int | tuple, float | None, ...)."""
    hint = f.type
    kinds = set(hint.__args__) if isinstance(hint, types.UnionType) else {hint}
    if f.default is None:
        kinds.add(type(None))
    return kinds


def _show(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_scalar(name, value, kinds):
    """One value against the accepted kinds and BOUNDS[name]; returns an error message or None."""
    if value is None:
        return None if type(None) in kinds else "must not be null"
    if isinstance(value, bool):
        return None if bool in kinds else "must be a number, not true/false"
    if isinstance(value, str):
        return None if str in kinds else "must be a number, not a string"
    is_int = isinstance(value, int)
    if is_int and int not in kinds and float not in kinds or not is_int and not isinstance(value, float):
        return f"must be one of {'/'.join(sorted(k.__name__ for k in kinds))}"
    if not is_int and int in kinds and float not in kinds:
        return "must be an integer"
    if not is_int and not math.isfinite(value):
        return "must be finite"
    lo, hi = BOUNDS.get(name, (0, MAX_WIDTH) if is_int and float not in kinds else FLOAT_BOUNDS)
    if not lo <= value <= hi:
        return f"is out of range [{lo}, {hi}]"
    return None


def checked_kwargs(cls, config, source):
    """The config dict's entries that are fields of dataclass `cls`, each checked (module docstring), lists
    turned into tuples -> keyword arguments for cls. A bad field raises a one-line ValueError naming
    `source` (None: the caller names the file) and the field."""
    where = f"{source}: " if source else ""
    if not isinstance(config, dict):
        raise ValueError(f"{where}must hold a JSON object ({{...}}), got a {type(config).__name__}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in config or not f.init:
            continue
        value, kinds = config[f.name], _kinds(f)
        if isinstance(value, (list, tuple)):
            if tuple not in kinds:
                raise ValueError(f"{where}{f.name}={_show(value)} must be a single value, not a list")
            if not 1 <= len(value) <= MAX_LEVELS:
                raise ValueError(f"{where}{f.name} must list 1 to {MAX_LEVELS} entries, got {len(value)}")
            default = f.default if isinstance(f.default, tuple) and f.default else (f.default,)
            inner = {type(default[0])} - {type(None)} or {int}
            for v in value:
                problem = _check_scalar(f.name, v, inner)
                if problem:
                    raise ValueError(f"{where}{f.name} entry {_show(v)} {problem}")
            value = tuple(value)
        elif kinds <= {tuple, type(None)} and value is not None:
            raise ValueError(f"{where}{f.name}={_show(value)} must be a list")
        else:
            problem = _check_scalar(f.name, value, kinds - {tuple})
            if problem:
                raise ValueError(f"{where}{f.name}={_show(value)} {problem}")
        kwargs[f.name] = value
    return kwargs
