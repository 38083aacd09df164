"""LoRA: low-rank adapters on named Linear / Conv2d layers (Hu et al. 2021, "LoRA", Eq. 3).

    h = W x + (alpha / r) * scale * B A x,    A: (r, in) gaussian std 1/r,  B: (out, r) zeros

so a fresh adapter changes nothing. `inject_lora` swaps each target layer for a `LoRALinear` /
`LoRAConv2d`: the same class of layer (it subclasses nn.Linear / nn.Conv2d) that adopts the original
weight and bias Parameters, plus children `lora_A` and `lora_B`. So `to_q.weight` stays the base key,
the adapter adds `to_q.lora_A.weight` and `to_q.lora_B.weight` (diffusers' key names, minus the
"unet." prefix), and no weight is copied. One set of base weights serves as teacher and student:
`lora_disabled(model)` gives exactly the base model (docs/method.md, "Roles").

Init: A ~ N(0, 1/r^2) as PEFT's init_lora_weights="gaussian" (the Flash reference's "A gaussian");
PEFT's default is kaiming-uniform. For a Conv2d, A has the layer's kernel and B is 1x1 (as PEFT).

Formats read and written (docs/method.md, "LoRA"):
  diffusers  [unet.|transformer.]<module>.lora_A.weight / .lora_B.weight (alpha in the safetensors
             metadata "lora_adapter_metadata" or <module>.alpha; else alpha = rank); the older
             <module>.lora.down/up.weight and <attn>.processor.to_q_lora.down/up.weight forms.
             Written with alpha / r folded into lora_B, so any loader gets scale 1 right.
  peft       base_model.model.<module>.lora_A.weight + adapter_config.json (r, lora_alpha, patterns).
  kohya      lora_unet_<module with _ for .>.lora_down.weight / .lora_up.weight / .alpha; the name is
             mapped back by matching the model's module names (diffusers-named models only: kohya
             files with LDM names such as input_blocks_4_1 need the single-file renames first).
Text-encoder keys (text_encoder., lora_te*) are skipped: this file adapts one denoiser.
"""
import json
import math
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from flash.io import read_json, read_safetensors, write_json, write_safetensors

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The reference's PixArt list also names "proj_in", but the PixArt transformer has no module of that name (its
# patch embedding is pos_embed.proj), so the pattern matched nothing and is left out.
PIXART_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
                  "adaln_single.emb.timestep_embedder.linear_2", "caption_projection.linear_1",
                  "caption_projection.linear_2")
SKIPPED_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te")


class LoRALayer:
    """The adapter part shared by LoRALinear and LoRAConv2d (mixed in before the torch layer class)."""

    def _add_lora(self, A, B, rank, alpha, dropout):
        self.lora_A, self.lora_B = A, B
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha = rank, float(alpha)
        self.lora_scale = 1.0          # the user's strength knob, on top of alpha / rank
        self.lora_enabled = True
        self.merged = False
        for child in (A, B, self.lora_dropout):     # new children follow the layer's train / eval mode
            child.train(self.training)

    @property
    def scaling(self):
        return self.lora_scale * self.alpha / self.rank

    def forward(self, x):
        out = super().forward(x)
        if self.lora_enabled and not self.merged and self.lora_scale != 0:
            dx = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
            out = out + (dx * self.scaling).to(out.dtype)
        return out

    def delta_weight(self):
        """(alpha / r) scale B A, shaped like the base weight, in fp32."""
        A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
        return (B.flatten(1) @ A.flatten(1)).reshape(self.weight.shape) * self.scaling

    def fuse(self):
        if not self.merged:
            with torch.no_grad():
                self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    def unfuse(self):
        if self.merged:
            with torch.no_grad():
                self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False


class LoRALinear(LoRALayer, nn.Linear):
    pass


class LoRAConv2d(LoRALayer, nn.Conv2d):
    pass


def _new_ab(base, rank, dtype=None):
    """Fresh lora_A (gaussian, std 1/r) and lora_B (zeros) for `base`, on its device."""
    device, dtype = base.weight.device, dtype or base.weight.dtype
    if isinstance(base, nn.Linear):
        A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
    else:
        A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, device=device, dtype=dtype)
        B = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=dtype)
    if device.type != "meta":
        nn.init.normal_(A.weight, std=1 / rank)
        nn.init.zeros_(B.weight)
    return A, B


def _wrap(base, rank, alpha, dropout=0.0, dtype=None):
    """A LoRA layer that owns `base`'s Parameters (built on meta: nothing is allocated twice)."""
    if type(base) is nn.Linear:
        new = LoRALinear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    elif type(base) is nn.Conv2d and base.groups == 1:
        new = LoRAConv2d(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, 1, base.bias is not None, base.padding_mode, device="meta")
    else:
        raise ValueError(f"LoRA supports nn.Linear and ungrouped nn.Conv2d, not {type(base).__name__}")
    new.weight, new.bias = base.weight, base.bias
    new.train(base.training)
    new._add_lora(*_new_ab(base, rank, dtype), rank, alpha, dropout)
    return new


def _matches(name, patterns):
    """PEFT's rule: a pattern matches a module name exactly or as a dotted suffix."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_lora(model, rank, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, dtype=None, names=None):
    """Attach a fresh adapter (rank, alpha; alpha defaults to rank) to every Linear / Conv2d whose name
    matches a target (exact or dotted suffix), or to exactly `names`. Returns the adapted names."""
    if names is None:
        names = [n for n, m in model.named_modules()
                 if _matches(n, targets) and (type(m) in (nn.Linear, nn.Conv2d) or isinstance(m, LoRALayer))]
        if not names:
            raise ValueError(f"inject_lora: no nn.Linear / nn.Conv2d module matches targets {list(targets)}")
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LoRALayer):
            raise ValueError(f"inject_lora: {n} already has a LoRA adapter")
        _set_module(model, n, _wrap(m, rank, rank if alpha is None else alpha, dropout, dtype))
    return list(names)


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model):
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def count_lora_params(model):
    return sum(p.numel() for p in lora_parameters(model))


def mark_only_lora_trainable(model):
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def set_lora_enabled(model, enabled):
    for n, m in lora_modules(model).items():
        if m.merged and not enabled:
            raise ValueError(f"LoRA on {n} is fused into the base weights: unfuse_lora(model) before disabling it")
        m.lora_enabled = enabled


@contextmanager
def lora_disabled(model):
    """The base model (the teacher) for the duration of the block; the adapter state is restored after."""
    previous = {n: m.lora_enabled for n, m in lora_modules(model).items()}
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for n, m in lora_modules(model).items():
            m.lora_enabled = previous.get(n, True)


def set_lora_scale(model, scale):
    for n, m in lora_modules(model).items():
        if m.merged:
            raise ValueError(f"LoRA on {n} is fused: unfuse_lora(model) before changing its scale")
        m.lora_scale = float(scale)


def fuse_lora(model):
    """W += (alpha / r) scale B A in place, so inference runs at the base model's cost; unfuse_lora
    subtracts it again (exact up to rounding in the weights' dtype)."""
    for m in lora_modules(model).values():
        m.fuse()


def unfuse_lora(model):
    for m in lora_modules(model).values():
        m.unfuse()


# -- key formats ------------------------------------------------------------------------------------
# Every reader returns {module name: (A, B, alpha)} with A, B shaped as in lora_A / lora_B.


def _alpha_from_config(config, module, rank):
    """PEFT semantics: alpha_pattern / rank_pattern keys match a dotted suffix of the module name."""
    def lookup(patterns, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?{key}$", module):
                return value
        return default
    alpha = lookup(config.get("alpha_pattern"), config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        alpha = alpha * rank ** 0.5            # scaling alpha / sqrt(r) expressed as alpha' / r
    return float(alpha)


def _check_supported(sd, config, source):
    if config and (config.get("use_dora") or config.get("peft_type", "LORA") != "LORA"):
        raise ValueError(f"{source}: only plain LoRA adapters are supported "
                         f"(this one is DoRA or {config.get('peft_type')})")
    for k in sd:
        if "magnitude_vector" in k or "dora_scale" in k or ".hada_" in k or ".lokr_" in k:
            raise ValueError(f"{source}: key {k} belongs to a DoRA / LyCORIS adapter, which is not supported")
        if (".lora_B" in k or ".lora_up" in k or ".lora.up" in k) and k.endswith(".bias"):
            raise ValueError(f"{source}: key {k}: LoRA bias terms are not supported")


def from_peft(sd, config):
    pairs = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", k):
            pairs.setdefault(m.group(1), {})[m.group(2)] = v      # (an adapter name may sit before .weight)
    out = {}
    for n, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {n} has only lora_{''.join(ab)}; expected both lora_A and lora_B")
        rank = ab["A"].shape[0]     # no adapter_config.json: alpha = rank (scale 1), as diffusers assumes
        out[n] = (ab["A"], ab["B"], _alpha_from_config(config, n, rank) if config else rank)
    return out


_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def from_diffusers(sd, metadata=None):
    """All three diffusers layouts; component prefixes (unet., transformer.) are stripped."""
    pairs, alphas = {}, {}
    for k, v in sd.items():
        k = re.sub(r"^(unet|transformer)\.", "", k)
        if m := _PROCESSOR.fullmatch(k):
            name = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
            pairs.setdefault(name, {})["A" if m.group(3) == "down" else "B"] = v
        elif m := re.fullmatch(r"(.+?)\.(?:lora_(A|B)|lora\.(down|up))\.weight", k):
            pairs.setdefault(m.group(1), {})["A" if (m.group(2) == "A" or m.group(3) == "down") else "B"] = v
        elif k.endswith(".alpha"):
            if v.numel() != 1:
                raise ValueError(f"{k}: a LoRA alpha is one number, got shape {tuple(v.shape)}")
            alphas[k[:-len(".alpha")]] = float(v)
    meta = {}
    if metadata and metadata.get("lora_adapter_metadata"):
        try:
            packed = json.loads(metadata["lora_adapter_metadata"])
        except (ValueError, RecursionError):
            packed = None
        if not isinstance(packed, dict):
            raise ValueError("LoRA metadata lora_adapter_metadata is not a JSON object")
        meta = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(("unet.", "transformer."))}
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {name} has only lora_{''.join(ab)}; expected both A (down) and B (up)")
        rank = ab["A"].shape[0]
        alpha = alphas.get(name, _alpha_from_config(meta, name, rank) if meta else rank)
        out[name] = (ab["A"], ab["B"], alpha)
    return out


def from_kohya(sd, module_names):
    """kohya flattens module paths with '_'; map them back through the model's own names."""
    flat = Counter(n.replace(".", "_") for n in module_names)
    lookup = {n.replace(".", "_"): n for n in module_names if flat[n.replace(".", "_")] == 1}
    out, unknown = {}, []
    for k, A in sd.items():
        m = re.fullmatch(r"lora_(?:unet|transformer)_(.+)\.lora_down\.weight", k)
        if not m:
            continue
        key, stem = m.group(1), k[:-len(".lora_down.weight")]
        B, alpha = sd.get(f"{stem}.lora_up.weight"), sd.get(f"{stem}.alpha")
        if B is None:
            raise ValueError(f"LoRA key {k} has no matching {stem}.lora_up.weight")
        if key not in lookup:
            unknown.append(key)
            continue
        out[lookup[key]] = (A, B, float(alpha) if alpha is not None else A.shape[0])
    for key in unknown:            # reported by parse_lora as unmatched, under the file's own key
        out[f"lora_unet_{key}"] = (None, None, None)
    return out


def detect_format(sd):
    keys = [k for k in sd if not k.startswith(SKIPPED_PREFIXES)]
    if any(k.startswith("lora_unet_") or k.startswith("lora_transformer_") for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    return "diffusers"


def read_lora(source):
    """A LoRA file or folder -> (state_dict, safetensors metadata, adapter_config or None, name)."""
    path = Path(source)
    config = None
    if path.is_dir():
        for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ValueError(f"{source}: no adapter_model.safetensors or pytorch_lora_weights.safetensors here")
    if (path.parent / "adapter_config.json").is_file() and path.name == "adapter_model.safetensors":
        config = read_json(path.parent / "adapter_config.json", "adapter_config.json")
        if not isinstance(config, dict):
            raise ValueError(f"{path.parent / 'adapter_config.json'}: must hold a JSON object")
    sd = read_safetensors(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return sd, metadata, config, str(path)


def parse_lora(sd, model, metadata=None, config=None, source="LoRA"):
    """Any supported layout -> {module: (A, B, alpha)} checked against `model`'s layers (one-line errors)."""
    _check_supported(sd, config, source)
    sd = {k: v for k, v in sd.items() if not k.startswith(SKIPPED_PREFIXES)}
    fmt = "peft" if config is not None else detect_format(sd)      # config: adapter_config.json
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.endswith((".lora_A", ".lora_B"))}
    if fmt == "kohya":
        lora = from_kohya(sd, list(layers))
    elif fmt == "peft":
        lora = from_peft(sd, config or {})
    else:
        lora = from_diffusers(sd, metadata)
    if not lora:
        raise ValueError(f"{source}: no LoRA weights found (keys look like {list(sd)[:2]})")
    missing = sorted(n for n in lora if n not in layers)
    if len(missing) == len(lora):
        raise ValueError(f"{source}: this LoRA matches no module of the model (e.g. {missing[0]}); "
                         f"is it for another model?")
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(lora)} LoRA modules are not in the model, "
                         f"e.g. {', '.join(missing[:3])}")
    for n, (A, B, alpha) in list(lora.items()):
        w = layers[n].weight
        A, B = _fit(A, w), _fit(B, w)
        if A.shape[1] != w.shape[1] or B.shape[0] != w.shape[0] or A.shape[0] != B.shape[1]:
            raise ValueError(f"{source}: {n}: LoRA shapes A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                             f"the layer weight {tuple(w.shape)}")
        lora[n] = (A, B, alpha)
    return lora


def _fit(t, weight):
    """Linear <-> 1x1 conv: kohya saves SD1.5's proj_in/out as 1x1 convs, SD2/SDXL models use Linear."""
    if weight.ndim == 2 and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    if weight.ndim == 4 and t.ndim == 2:
        return t[:, :, None, None]
    return t


def load_lora(model, source, scale=1.0, fuse=False, dtype=None):
    """Load a LoRA (a path in any supported format, or a state dict) into `model`.

    fuse=False attaches it as adapters (enable / disable / scale / unfuse all work; an adapter already
    on a layer is replaced). fuse=True adds (alpha / r) scale B A straight into the base weights
    (stackable: several LoRAs at once; not undoable). Returns the names of the adapted modules.
    """
    if isinstance(source, dict):
        sd, metadata, config, name = source, {}, None, "LoRA state dict"
    else:
        sd, metadata, config, name = read_lora(source)
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name}: the LoRA scale must be a finite number, got {scale}")
    lora = parse_lora(sd, model, metadata, config, name)
    # checked before anything is changed: one NaN fused into the weights blackens every image, silently
    for n, (A, B, alpha) in lora.items():
        if not (torch.isfinite(A).all() and torch.isfinite(B).all() and math.isfinite(float(alpha))):
            raise ValueError(f"{name}: the LoRA of {n} holds NaN or infinite values")
    with torch.no_grad():
        for n, (A, B, alpha) in lora.items():
            layer = model.get_submodule(n)
            if fuse:
                delta = (B.float().flatten(1) @ A.float().flatten(1)).reshape(layer.weight.shape)
                layer.weight.add_((delta * (scale * alpha / A.shape[0])).to(layer.weight))
                continue
            if isinstance(layer, LoRALayer):          # replace the adapter, keep the layer
                if layer.merged:
                    raise ValueError(f"{name}: {n} has a fused LoRA; unfuse_lora(model) before loading another")
                layer._add_lora(*_new_ab(layer, A.shape[0], dtype or layer.lora_A.weight.dtype),
                                A.shape[0], alpha, 0.0)
            else:
                layer = _wrap(layer, A.shape[0], alpha, 0.0, dtype)
                _set_module(model, n, layer)
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
            layer.lora_scale = float(scale)
    return sorted(lora)


def get_lora(model):
    """{module: (A, B, alpha)} of the model's adapters (the user scale is not part of the adapter)."""
    return {n: (m.lora_A.weight.detach(), m.lora_B.weight.detach(), m.alpha) for n, m in lora_modules(model).items()}


def lora_state_dict(model, format="diffusers", prefix="unet"):
    """The adapters as a state dict in `format` ("diffusers", "peft" or "kohya"; prefix: the diffusers
    component "unet" / "transformer", or for kohya "lora_unet"). For PEFT pair it with peft_config()."""
    lora = get_lora(model)
    if not lora:
        raise ValueError("lora_state_dict: the model has no LoRA adapters")
    sd = {}
    for n, (A, B, alpha) in lora.items():
        r = A.shape[0]
        if format == "diffusers":        # alpha / r folded into B: loaders assume alpha = rank
            sd[f"{prefix}.{n}.lora_A.weight"] = A.clone()
            sd[f"{prefix}.{n}.lora_B.weight"] = B.clone() if alpha == r else (B.float() * (alpha / r)).to(B.dtype)
        elif format == "peft":
            sd[f"base_model.model.{n}.lora_A.weight"] = A.clone()
            sd[f"base_model.model.{n}.lora_B.weight"] = B.clone()
        elif format == "kohya":
            key = f"{prefix if prefix.startswith('lora_') else 'lora_' + prefix}_{n.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = A.clone(), B.clone()
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:
            raise ValueError(f"lora_state_dict: format must be diffusers, peft or kohya, got {format!r}")
    return sd


def peft_config(model):
    """adapter_config.json for the PEFT format: the most common rank / alpha, exceptions as patterns."""
    lora = get_lora(model)
    ranks = {n: A.shape[0] for n, (A, _, _) in lora.items()}
    alphas = {n: a for n, (_, _, a) in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    suffixes = {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in lora}
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(suffixes),
            "rank_pattern": {n: v for n, v in ranks.items() if v != r},
            "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": "gaussian", "fan_in_fan_out": False, "modules_to_save": None,
            "task_type": None, "base_model_name_or_path": None}


def save_lora(model, path, format="diffusers", prefix="unet"):
    """Write the adapters: diffusers / kohya -> one .safetensors file at `path`; peft -> folder `path`
    with adapter_model.safetensors and adapter_config.json. Written atomically."""
    path = Path(path)
    sd = lora_state_dict(model, format, prefix)
    if format == "peft":
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(sd, path / "adapter_model.safetensors", metadata={"format": "pt"})
        write_json(peft_config(model), path / "adapter_config.json", sort_keys=False)
        return path
    write_safetensors(sd, path, metadata={"format": "pt"})
    return path
