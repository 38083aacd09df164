"""sample.py, the command line: a run on a tiny pipeline folder saved by diffusers gives diffusers' image for
the same seed, with its settings in the PNG metadata; --help documents every flag; each bad argument ends
with one line on stderr and a non-zero exit, never a traceback.

Most error cases call `sample.main(argv)` in-process (what the script runs); a few go through a real
subprocess to check the whole path (interpreter start, argparse, exit status).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from test_pipeline import make_sd15
from weights.io import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "--prompt", "--prompts-file", "--negative-prompt", "--steps", "--sampler", "--guidance",
         "--seed", "--height", "--width", "--batch", "--lora", "--out", "--device", "--dtype"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD1.5-like pipeline folder (random weights, the shipped CLIP vocabulary), and diffusers' pipeline."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cli") / "tiny-sd"
    pipe = make_sd15(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def main_error(capsys, argv):
    """Run sample.main in-process; return (exit code, stderr lines)."""
    try:
        code = sample.main([str(a) for a in argv])
    except SystemExit as e:           # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_sample_matches_diffusers(model, tmp_path):
    """LCM, 4 steps, seed 5, 32x24: the PNG equals diffusers' LCMScheduler image, rounded to 8 bits."""
    from diffusers import LCMScheduler
    folder, pipe = model
    out = tmp_path / "x.png"
    r = run("--model", folder, "--steps", 4, "--sampler", "lcm", "--seed", 5, "--height", 32, "--width", 24,
            "--prompt", "a photo of a cat", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and f"wrote {out}" in r.stdout
    image = Image.open(out)
    assert image.size == (24, 32) and image.mode == "RGB"
    meta = image.text
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["sampler"], meta["guidance"], meta["model"]) == \
        ("a photo of a cat", "5", "4", "lcm", "0.0", str(folder))

    pipe.scheduler = LCMScheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    with torch.no_grad():
        want = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=0.0, height=32, width=24,
                    generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    got = np.asarray(image).astype(np.float64) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6            # only the 8-bit rounding differs
    assert np.abs(got - want).max() < np.abs(got - want[::-1]).max()   # and the comparison can fail


def test_defaults_grid_and_prompts_file(model, tmp_path, capsys):
    """Flash sampler, 4 steps, the model's default size (sample_size 8 x VAE factor 2 = 16); two prompts
    (one from a file) x --batch 2 -> a 2 x 2 grid, a row per prompt."""
    folder, _ = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus\n\n")
    out = tmp_path / "sub" / "grid.png"
    assert sample.main(["--model", str(folder), "--prompt", "a cat", "--prompts-file", str(prompts),
                        "--batch", "2", "--out", str(out), "--guidance", "1.5", "--negative-prompt", "dark"]) == 0
    image = Image.open(out)
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a cat\na red bus" and image.text["sampler"] == "flash"
    assert image.text["guidance"] == "1.5" and image.text["negative_prompt"] == "dark"
    px = np.asarray(image)
    assert not np.array_equal(px[:16, :16], px[:16, 16:])      # two images of one prompt differ (other noise)


def test_help_documents_every_flag():
    r = run("--help")
    assert r.returncode == 0
    for flag in FLAGS:
        assert flag in r.stdout, flag
    assert all(name in r.stdout for name in ("flash", "lcm", "ddim", "euler", "dpm++2m", "fp16", "bf16"))


@pytest.mark.parametrize("args, needle", [
    (["--sampler", "heun", "--prompt", "a"], "invalid choice"),
    (["--model", "does/not/exist", "--prompt", "a"], "does/not/exist"),
])
def test_errors_in_a_subprocess(args, needle):
    r = run(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]


def bad_lora(path):
    write_safetensors({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(2, 16),
                       "unet.no_such_block.to_q.lora_B.weight": torch.zeros(16, 2)}, path)
    return path


@pytest.mark.parametrize("case, needle", [
    ("steps", "--steps"),
    ("height", "--height"),
    ("width-model", "multiple of 8"),
    ("batch", "--batch"),
    ("no-prompt", "no prompt"),
    ("prompts-file", "no such file"),
    ("unreadable-model", "bad.safetensors"),
    ("pickle-model", "model.ckpt"),
    ("lora-no-match", "matches no module"),
    ("lora-missing", "--lora"),
    ("device", "--device"),
    ("dtype", "invalid choice"),
    ("out", ".png"),
])
def test_bad_arguments_one_line(model, tmp_path, capsys, case, needle):
    folder, _ = model
    base = ["--model", folder, "--prompt", "a cat", "--out", tmp_path / "x.png"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    argv = {
        "steps": base + ["--steps", 0],
        "height": base + ["--height", 20],
        "width-model": base + ["--width", 12],
        "batch": base + ["--batch", 0],
        "no-prompt": ["--model", folder],
        "prompts-file": ["--model", folder, "--prompts-file", tmp_path / "missing.txt"],
        "unreadable-model": ["--model", tmp_path / "bad.safetensors", "--prompt", "a"],
        "pickle-model": ["--model", tmp_path / "model.ckpt", "--prompt", "a"],
        "lora-no-match": base + ["--lora", f"{bad_lora(tmp_path / 'lora.safetensors')}:0.5"],
        "lora-missing": base + ["--lora", tmp_path / "nope.safetensors"],
        "device": base + ["--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"],
        "dtype": base + ["--dtype", "fp8"],
        "out": base[:-1] + [tmp_path / "x.jpg"],
    }[case]
    code, err = main_error(capsys, argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and needle in err[0], err[0]
    assert not (tmp_path / "x.png").exists()


def test_missing_default_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", tmp_path / "digits")
    code, err = main_error(capsys, ["--prompt", "a 7"])
    assert code == 1 and len(err) == 1 and "not built yet" in err[0] and "--model" in err[0]


def test_lora_spec_parsing():
    assert sample.parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert sample.parse_lora("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert sample.parse_lora("C:/x/y.safetensors") == ("C:/x/y.safetensors", 1.0)
    assert sample.parse_lora("C:/x/y.safetensors:-1") == ("C:/x/y.safetensors", -1.0)


def test_lora_scale(model, tmp_path, capsys):
    """--lora PATH:0 leaves the image as it is; PATH:1 changes it; the metadata records it."""
    import weights
    from flash import lora as L
    folder, _ = model
    unet = weights.load_unet(folder / "unet")
    L.inject_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    path = L.save_lora(unet, tmp_path / "lora.safetensors")
    images = {}
    for spec in ("none", f"{path}:0", f"{path}:1"):
        out = tmp_path / f"{len(images)}.png"
        argv = ["--model", str(folder), "--prompt", "a cat", "--out", str(out), "--steps", "2"]
        assert sample.main(argv + (["--lora", spec] if spec != "none" else [])) == 0
        images[spec] = np.asarray(Image.open(out))
    assert np.array_equal(images["none"], images[f"{path}:0"])
    assert np.abs(images["none"].astype(int) - images[f"{path}:1"]).max() > 10
    assert Image.open(tmp_path / "2.png").text["lora"] == f"{path}:1"
