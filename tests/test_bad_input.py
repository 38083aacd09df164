"""Bad input to sampling, evaluation and loading (issue 15: items 2, 4, 5, 7 and the sampling parts of 8
and 9) ends in one line on stderr and a non-zero exit, before any work, with nothing overwritten and no
traceback; valid input is untouched (tests/test_sample_cli.py and tests/test_digits.py check the images).

The memory cases run the script under an address-space limit (RLIMIT_AS, set in the child): the refusal
must come before the allocation it refuses, or the child dies of the limit instead of printing the line.
Sampling runs on the shipped weights/digits (15 MB), copied when a file of it is to be spoiled.
"""
import json
import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import flash.budget
import flash.pipeline
from flash.adapter import AdapterConfig
from flash.cli import MAX_IMAGES
from flash.clip import from_config_json as clip_config
from flash.clip_vision import from_config_json as clip_vision_config
from flash.dit import PixArtConfig
from flash.io import CheckpointError, read_json, write_png
from flash.schedule import NoiseSchedule
from flash.t5 import from_config_json as t5_config
from flash.unet import UNetConfig
from flash.vae import VAEConfig
from weights import load_pipeline
from weights.sd import build_adapter, build_unet, build_vae

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "weights" / "digits"
LIMIT = 6 << 30          # address space for the memory cases: torch and the digits fit, 100 GB does not


def run(script, *args, limit=None, timeout=120):
    """A script as a subprocess -> CompletedProcess; `limit`: RLIMIT_AS in bytes for the child."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap if limit else None)


def one_line(proc, *words):
    """The process failed with exactly one `error: ...` line naming each of `words`; returns it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture
def digits(tmp_path):
    """A copy of weights/digits to spoil."""
    return Path(shutil.copytree(DIGITS, tmp_path / "digits"))


def edit_json(path, fn):
    data = json.loads(path.read_text())
    data = fn(data) or data
    path.write_text(json.dumps(data))


# -- item 2: bounded memory and bounded reads ---------------------------------------------------------

def test_huge_batch_refused_up_front(tmp_path):
    one_line(run("sample.py", "--batch", 100000, "--out", tmp_path / "x.png", limit=LIMIT), str(MAX_IMAGES))
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("size", [["--height", 100000, "--width", 100000], ["--height", 100000]])
def test_huge_image_refused_before_allocation(tmp_path, size):
    one_line(run("sample.py", *size, "--out", tmp_path / "x.png", limit=LIMIT, timeout=60), "at most 128")


def test_prompts_file_device_refused(tmp_path):
    link = tmp_path / "prompts.txt"
    link.symlink_to("/dev/zero")
    for path in ("/dev/zero", link):
        one_line(run("sample.py", "--prompts-file", path, "--out", tmp_path / "x.png", limit=LIMIT),
                 "not a regular file")


def test_prompts_file_size_capped(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("a handwritten digit 1\n" * 100_000)        # 2.2 MB, over the 1 MiB cap
    one_line(run("sample.py", "--prompts-file", big, "--out", tmp_path / "x.png"), "limit")


def test_model_index_symlinked_to_device(digits, tmp_path):
    (digits / "model_index.json").unlink()
    (digits / "model_index.json").symlink_to("/dev/zero")
    one_line(run("sample.py", "--model", digits, "--prompt", "a handwritten digit 1", "--out", tmp_path / "x.png", limit=LIMIT), "model_index.json")


def test_every_json_read_is_bounded(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a": "x" * 1000}))
    with pytest.raises(ValueError, match="limit"):
        read_json(path, limit=100)
    path.write_text("[" * 100_000 + "]" * 100_000)              # deeper than the parser's recursion
    with pytest.raises(ValueError, match="not usable JSON"):
        read_json(path)


def test_shard_index_bounded_and_shaped(digits):
    unet = digits / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "part.safetensors")
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    index.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError) as e:       # never read: not a file
        load_pipeline(digits)
    assert "\n" not in str(e.value) and "unet" in str(e.value)
    index.unlink()
    index.write_text(json.dumps({"weight_map": ["part.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_pipeline(digits)
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../vae/diffusion_pytorch_model.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name"):
        load_pipeline(digits)


def test_generation_runs_in_chunks(monkeypatch):
    """With chunks of 4 images, the denoiser never sees more than 4 rows, and each chunk draws from the
    generator after the previous one: the first chunk is the 4-prompt call's images."""
    pipe = load_pipeline(DIGITS)
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    whole = flash.pipeline.generate(pipe, prompts[:4], steps=2, seed=1, progress=False)
    monkeypatch.setattr(flash.budget, "MAX_CHUNK", 4)
    rows = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    chunks = list(flash.pipeline.generate_chunks(pipe, prompts, steps=2, seed=1, progress=False))
    hook.remove()
    assert [len(c) for c in chunks] == [4, 4, 2] and max(rows) == 4
    assert torch.equal(chunks[0], whole)


def test_memory_estimate_refused_before_allocation(monkeypatch):
    pipe = load_pipeline(DIGITS)
    monkeypatch.setattr(flash.budget, "available_bytes", lambda device: 1 << 20)
    monkeypatch.setattr(flash.pipeline, "randn", lambda *a, **k: pytest.fail("noise drawn before the check"))
    with pytest.raises(ValueError, match="GiB of memory"):
        flash.pipeline.generate(pipe, ["a handwritten digit 1"] * 64, steps=1, progress=False)
    small = flash.budget.estimate_bytes(pipe, 1, 32, 32, False)
    assert flash.budget.estimate_bytes(pipe, 100, 32, 32, False) > small
    assert flash.budget.estimate_bytes(pipe, 1, 128, 128, True) > small


# -- item 4: non-finite numbers -----------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--guidance", "inf"], ["--guidance", "finite"]),
    (["--guidance", "nan"], ["--guidance", "finite"]),
    (["--task", "adapter", "--image", "IMAGE", "--adapter-scale", "nan"], ["--adapter-scale", "finite"]),
    (["--lora", f"{DIGITS / 'flash_lora.safetensors'}:nan"], ["scale", "finite"]),
    (["--lora", f"{DIGITS / 'flash_lora.safetensors'}:-inf"], ["scale", "finite"]),
    (["--seed", 2 ** 70], ["--seed", "2**64"]),
    (["--seed", -(2 ** 70)], ["--seed", "2**64"]),
])
def test_non_finite_numbers_refused(tmp_path, args, words):
    image = tmp_path / "edges.png"
    Image.new("L", (32, 32)).save(image)
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    one_line(run("sample.py", *[image if a == "IMAGE" else a for a in args], "--out", out), *words)
    assert out.read_bytes() == b"keep"


def test_nan_lora_file_refused(tmp_path):
    state = load_file(DIGITS / "flash_lora.safetensors")
    key = next(k for k in state if "lora" in k and state[k].is_floating_point() and state[k].numel() > 1)
    state[key].view(-1)[0] = math.nan
    bad = tmp_path / "nan_lora.safetensors"
    save_file(state, bad)
    one_line(run("sample.py", "--lora", bad, "--out", tmp_path / "x.png"), "nan")
    assert not (tmp_path / "x.png").exists()


def test_eval_guidance_inf_refused():
    one_line(run("eval.py", "--guidance", "inf", "--n", 2, "--real", 2), "--guidance", "finite")


# -- item 5: configs validated field by field ---------------------------------------------------------

@pytest.mark.parametrize("component, field, value", [
    ("unet", "norm_num_groups", 0), ("unet", "block_out_channels", [1e9]), ("unet", "block_out_channels", []),
    ("unet", "attention_head_dim", -4), ("unet", "layers_per_block", 10_000_000),
    ("unet", "cross_attention_dim", "wide"), ("unet", "sample_size", None), ("vae", "norm_num_groups", 0),
    ("vae", "block_out_channels", [32, -64, 64]), ("vae", "scaling_factor", "nan"),
    ("text_encoder", "num_attention_heads", -1), ("text_encoder", "hidden_size", 0),
    ("text_encoder", "num_hidden_layers", 10 ** 9), ("scheduler", "num_train_timesteps", 10 ** 12),
])
def test_config_field_refused(digits, component, field, value):
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    edit_json(digits / component / name, lambda c: c.update({field: value}))
    with pytest.raises((CheckpointError, ValueError)) as e:
        load_pipeline(digits)
    msg = str(e.value)
    assert "\n" not in msg and field in msg


@pytest.mark.parametrize("spoil", [lambda c: ["StableDiffusionPipeline"], lambda c: c.update(unet=[]),
                                   lambda c: c.update(unet="UNet2DConditionModel"),
                                   lambda c: c.update(_class_name=["StableDiffusionPipeline"])])
def test_model_index_shape_refused(digits, tmp_path, spoil):
    edit_json(digits / "model_index.json", spoil)
    one_line(run("sample.py", "--model", digits, "--prompt", "a handwritten digit 1", "--out", tmp_path / "x.png"), "model_index.json")


BAD_VALUES = [0, -1, 10 ** 12, 1e9, 2.5, "x", None, True, [], [0], [-3], ["x"], {}, math.nan, math.inf]


def _build_checked(kind, config):
    """The config through its from_config_json and, when accepted, the model built on the meta device."""
    if kind == "unet":
        build_unet(config)
    elif kind == "vae":
        build_vae(config)
    elif kind == "adapter":
        build_adapter(config)
    elif kind == "pixart":
        from flash.dit import build
        build(PixArtConfig.from_config_json(config), device="meta")
    elif kind == "clip":
        from flash.clip import CLIPTextModel
        with torch.device("meta"):
            CLIPTextModel(clip_config(config))
    elif kind == "t5":
        from flash.t5 import T5EncoderModel
        with torch.device("meta"):
            T5EncoderModel(t5_config(config))
    elif kind == "clip_vision":
        from flash.clip_vision import CLIPVisionModel
        with torch.device("meta"):
            CLIPVisionModel(clip_vision_config(config))
    elif kind == "scheduler":
        NoiseSchedule.from_config(config)


def _small(cls, **extra):
    from dataclasses import asdict
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cls()).items()
               if k not in ("betas", "alphas_cumprod")}, **extra}


CONFIG_CASES = {
    "unet": json.loads((DIGITS / "unet" / "config.json").read_text()),
    "vae": json.loads((DIGITS / "vae" / "config.json").read_text()),
    "adapter": {"in_channels": 1, "channels": [64, 128], "num_res_blocks": 1, "downscale_factor": 4},
    "pixart": {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "cross_attention_dim": 16,
               "sample_size": 8, "caption_channels": 12, "out_channels": 8},
    "clip": {**_small(type(clip_config({}))), "architectures": ["CLIPTextModel"], "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu"},
    "clip_vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": 32, "patch_size": 8},
    "scheduler": json.loads((DIGITS / "scheduler" / "scheduler_config.json").read_text()),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_CASES))
def test_any_bad_field_is_one_value_error(kind):
    """Every field of every config, set to each of a list of bad values: either it builds (the value is one
    the model takes) or a one-line ValueError names the field; never another exception."""
    base = CONFIG_CASES[kind]
    _build_checked(kind, base)
    fields_of = {"unet": UNetConfig, "vae": VAEConfig, "adapter": AdapterConfig, "pixart": PixArtConfig,
                 "clip": type(clip_config({})), "t5": type(t5_config({"feed_forward_proj": "gated-gelu"})),
                 "clip_vision": type(clip_vision_config({})), "scheduler": NoiseSchedule}[kind]
    for name in fields_of.__dataclass_fields__:
        if name in ("betas", "alphas_cumprod"):
            continue
        for value in BAD_VALUES:
            try:
                _build_checked(kind, {**base, name: value})
            except ValueError as e:       # CheckpointError is one
                assert "\n" not in str(e) and str(e), (name, value)
            except Exception as e:        # noqa: BLE001 - the point: nothing else may escape
                pytest.fail(f"{kind} {name}={value!r}: {type(e).__name__}: {e}")


def test_bad_config_in_sample_is_one_line(digits, tmp_path):
    edit_json(digits / "unet" / "config.json", lambda c: c.update(norm_num_groups=0))
    one_line(run("sample.py", "--model", digits, "--prompt", "a handwritten digit 1", "--out", tmp_path / "x.png"), "norm_num_groups")


# -- item 7: output paths checked first, writes atomic ------------------------------------------------

@pytest.mark.parametrize("where", ["folder", "under_file"])
def test_sample_out_checked_before_work(tmp_path, where):
    (tmp_path / "file.png").write_bytes(b"keep")
    out = tmp_path if where == "folder" else tmp_path / "file.png" / "x.png"
    proc = run("sample.py", "--out", out)
    one_line(proc, "--out")
    assert "flash:" not in proc.stderr          # no sampling progress: refused before the model ran
    assert (tmp_path / "file.png").read_bytes() == b"keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sample_out_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_line(run("sample.py", "--out", folder / "x.png"), "not writable")
    finally:
        folder.chmod(0o700)


def test_eval_json_checked_before_work(tmp_path):
    (tmp_path / "file").write_text("keep")
    for path in (tmp_path, tmp_path / "file" / "r.json"):
        one_line(run("eval.py", "--json", path, "--n", 2, "--real", 2, timeout=60), "--json")
    assert (tmp_path / "file").read_text() == "keep"


def test_png_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails midway (a full disk) leaves the previous PNG whole and no temporary file."""
    out = tmp_path / "x.png"
    write_png(Image.new("RGB", (4, 4), "red"), out)
    before = out.read_bytes()

    def half_then_fail(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError):
        write_png(Image.new("RGB", (4, 4), "blue"), out)
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == [out]


# -- items 8 and 9, sampling: empty prompts file, messages ----------------------------------------------

@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_prompts_file_refused(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    one_line(run("sample.py", "--prompts-file", path, "--out", tmp_path / "x.png"), "no prompt")
    assert not (tmp_path / "x.png").exists()


def test_task_image_of_wrong_size_named(tmp_path):
    image, mask = tmp_path / "digit.png", tmp_path / "hole.png"
    Image.new("RGB", (36, 36)).save(image)
    Image.new("L", (36, 36)).save(mask)
    line = one_line(run("sample.py", "--task", "inpaint", "--image", image, "--mask", mask,
                        "--out", tmp_path / "x.png"), "image", "36x36")
    assert "height" not in line


def test_width_help_says_the_model_size():
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    width = out[out.rindex("--width"):out.rindex("--batch")]      # the option's help, not the usage line
    assert "model's trained size" in " ".join(width.split()) and "as --height" not in width
