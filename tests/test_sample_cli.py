"""sample.py, the command line: a run on a tiny pipeline folder saved by diffusers gives diffusers' image for
the same seed, with its settings in the PNG metadata; --help documents every flag; each bad argument ends
with one line on stderr and a non-zero exit, never a traceback. The task models (inpaint, upscale, adapter;
tiny random digits pipelines, tests/test_eval_tasks.py) give flash.pipeline.generate's image for the files
given, beside a picture of the input, and the shipped task demos are picked by --task.

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

import flash.cli
import sample
from flash.cli import parse_lora
from flash.io import write_safetensors
from helpers import make_sd15, task_pipeline

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "--prompt", "--prompts-file", "--negative-prompt", "--steps", "--sampler", "--guidance",
         "--seed", "--height", "--width", "--batch", "--lora", "--out", "--device", "--dtype", "--task", "--image",
         "--mask", "--upscale", "--adapter-scale", "--tiny-vae"]


@pytest.fixture(autouse=True)
def fp32_default(monkeypatch):
    """In-process runs pin fp32 pixels (flash.pipeline.generate's, diffusers'): the default dtype of a CPU
    without bf16 units, whatever this one has (the bf16 path: tests/test_cpu.py, test_digits.py)."""
    import flash.cpu
    monkeypatch.setattr(flash.cpu, "native_bf16", lambda: False)


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
            "--prompt", "a photo of a cat", "--dtype", "fp32", "--out", out)   # diffusers' default dtype
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
    monkeypatch.setattr(flash.cli, "DEFAULT_MODEL", tmp_path / "digits")
    code, err = main_error(capsys, ["--prompt", "a 7"])
    assert code == 1 and len(err) == 1 and "not built yet" in err[0] and "--model" in err[0]


def test_lora_spec_parsing():
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_lora("C:/x/y.safetensors") == ("C:/x/y.safetensors", 1.0)
    assert parse_lora("C:/x/y.safetensors:-1") == ("C:/x/y.safetensors", -1.0)


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


# -- task models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """{task: folder} of tiny random digits task pipelines, and the input files: a 32x32 RGB image, a mask
    (a white box), an 8x8 and a 16x16 low-res image, a 32x32 edge map, a 24x32 mask, a broken PNG."""
    from weights.save import save_pipeline
    root = tmp_path_factory.mktemp("tasks")
    folders = {}
    for task in ("inpaint", "upscale", "adapter"):
        save_pipeline(task_pipeline(task), root / task)
        folders[task] = root / task
    rng = np.random.default_rng(0)
    files = {"image": rng.integers(0, 256, (32, 32, 3)), "small": rng.integers(0, 256, (8, 8, 3)),
             "half": rng.integers(0, 256, (16, 16, 3)), "edges": (rng.random((32, 32)) < 0.2) * 255,
             "mask": np.zeros((32, 32)), "wide-mask": np.zeros((24, 32))}
    files["mask"][8:20, 4:16] = 255
    for name, px in files.items():
        Image.fromarray(px.astype(np.uint8)).save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folders, {name: root / f"{name}.png" for name in [*files, "broken"]}


def pixels(path):
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255)


def expected(folder, prompt, batch=1, **condition):
    """flash.pipeline.generate's images side by side (H, batch * W, 3) for the same arguments, as in the PNG."""
    import weights
    from flash.pipeline import generate
    pipe = weights.load_pipeline(folder)
    images = generate(pipe, [prompt], steps=2, sampler="flash", seed=0, progress=False, batch=batch, **condition)
    return torch.cat(list(images), dim=2).permute(1, 2, 0)


def test_inpaint(tasks, tmp_path):
    folders, files = tasks
    out = tmp_path / "inpaint.png"
    assert sample.main(["--model", str(folders["inpaint"]), "--image", str(files["image"]), "--mask",
                        str(files["mask"]), "--prompt", "a handwritten digit seven", "--steps", "2",
                        "--out", str(out)]) == 0
    got = pixels(out)
    assert got.shape == (32, 64, 3)                                   # the input, then the output
    image, mask = pixels(files["image"]), pixels(files["mask"])[..., None]
    want = expected(folders["inpaint"], "a handwritten digit seven", image=image.permute(2, 0, 1)[None],
                    mask=mask.permute(2, 0, 1)[None])
    assert (got[:, 32:] - want).abs().max() <= 1 / 255 + 1e-6
    overlay = image * (1 - mask / 2) + torch.tensor([1.0, 0, 0]) * mask / 2      # the hole tinted red
    assert (got[:, :32] - overlay).abs().max() <= 1 / 255 + 1e-6
    meta = Image.open(out).text
    assert (meta["task"], meta["image"], meta["mask"]) == ("inpaint", str(files["image"]), str(files["mask"]))


@pytest.mark.parametrize("factor", [None, 2])
def test_upscale(tasks, tmp_path, factor):
    folders, files = tasks
    low = files["small"] if factor is None else files["half"]
    out = tmp_path / "up.png"
    argv = ["--model", str(folders["upscale"]), "--image", str(low), "--prompt", "a 3", "--steps", "2", "--out",
            str(out)] + (["--upscale", str(factor)] if factor else [])
    assert sample.main(argv) == 0
    got, f = pixels(out), factor or 4                                  # default: 4x (8 -> 32)
    assert got.shape == (32, 64, 3)
    small = pixels(low)
    assert torch.equal(got[:, :32], small.repeat_interleave(f, 0).repeat_interleave(f, 1))   # enlarged, nearest
    want = expected(folders["upscale"], "a 3", image=small.permute(2, 0, 1)[None], upscale=f)
    assert (got[:, 32:] - want).abs().max() <= 1 / 255 + 1e-6
    assert Image.open(out).text["upscale"] == (str(factor) if factor else "")


def test_adapter_grayscale_condition_and_scale(tasks, tmp_path):
    folders, files = tasks
    outs = []
    for scale in ("1", "0"):
        outs.append(tmp_path / f"adapter{scale}.png")
        assert sample.main(["--model", str(folders["adapter"]), "--image", str(files["edges"]), "--prompt", "a 3",
                            "--steps", "2", "--adapter-scale", scale, "--out", str(outs[-1]),
                            "--batch", "2"]) == 0
    got = pixels(outs[0])
    assert got.shape == (32, 96, 3)                                    # the edge map, then 2 outputs
    edges = pixels(files["edges"])
    assert torch.equal(got[:, :32], edges[..., None].expand(-1, -1, 3))
    want = expected(folders["adapter"], "a 3", batch=2, adapter_image=edges[None, None])   # 1 channel, as read
    assert (got[:, 32:] - want).abs().max() <= 1 / 255 + 1e-6
    assert (got[:, 32:] - pixels(outs[1])[:, 32:]).abs().max() > 0.05   # --adapter-scale 0 drops the condition
    assert Image.open(outs[1]).text["adapter_scale"] == "0.0"


def test_shipped_task_demo(tasks, tmp_path, monkeypatch):
    """--task inpaint with no --model: weights/digits-inpaint, its Flash LoRA fused for the flash sampler
    only, the empty prompt when none is given."""
    import shutil
    folders, files = tasks
    shipped = tmp_path / "weights" / "digits-inpaint"
    shutil.copytree(folders["inpaint"], shipped)
    lora = shipped / "flash_lora.safetensors"
    bad_lora(lora)                                     # matches no module: fusing it must fail, loudly
    monkeypatch.setattr(flash.cli, "DEFAULT_MODEL", tmp_path / "weights" / "digits")
    argv = ["--task", "inpaint", "--image", str(files["image"]), "--mask", str(files["mask"]), "--steps", "2",
            "--out", str(tmp_path / "x.png")]
    assert sample.main(argv + ["--sampler", "ddim"]) == 0            # the teacher: no LoRA
    meta = Image.open(tmp_path / "x.png").text
    assert meta["prompt"] == "" and meta["lora"] == "" and meta["model"] == str(shipped)
    import weights
    from flash import lora as L
    unet = weights.load_unet(shipped / "unet")
    L.inject_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    L.save_lora(unet, lora)
    assert sample.main(argv) == 0                                     # flash: the student
    assert Image.open(tmp_path / "x.png").text["lora"] == str(lora)


@pytest.mark.parametrize("case, needle", [
    ("missing-image", "--image: missing"),
    ("missing-mask", "--mask: missing"),
    ("mask-size", "32x24 pixels"),
    ("image-t2i", "--image: "),
    ("mask-t2i", "--mask: "),
    ("mask-upscale", "--mask: "),
    ("upscale-adapter", "--upscale: "),
    ("unreadable", "not a readable image"),
    ("no-file", "no such file"),
    ("no-mask-file", "--mask"),
    ("task-mismatch", "--task upscale"),
    ("factor", "invalid choice"),
    ("shipped-no-image", "--image: missing"),
])
def test_task_errors_one_line(model, tasks, tmp_path, capsys, monkeypatch, case, needle):
    folders, files = tasks
    t2i, _ = model
    monkeypatch.setattr(flash.cli, "DEFAULT_MODEL", folders["inpaint"].parent / "digits")   # digits-inpaint absent
    shipped = folders["inpaint"].parent / "digits-adapter"
    shipped.mkdir(exist_ok=True)
    inpaint = ["--model", folders["inpaint"], "--prompt", "a 7", "--out", tmp_path / "x.png"]
    argv = {
        "missing-image": inpaint,
        "missing-mask": inpaint + ["--image", files["image"]],
        "mask-size": inpaint + ["--image", files["image"], "--mask", files["wide-mask"]],
        "image-t2i": ["--model", t2i, "--prompt", "a", "--image", files["image"], "--out", tmp_path / "x.png"],
        "mask-t2i": ["--model", t2i, "--prompt", "a", "--mask", files["mask"], "--out", tmp_path / "x.png"],
        "mask-upscale": ["--model", folders["upscale"], "--prompt", "a", "--image", files["small"], "--mask",
                         files["mask"], "--out", tmp_path / "x.png"],
        "upscale-adapter": ["--model", folders["adapter"], "--prompt", "a", "--image", files["edges"],
                            "--upscale", "2", "--out", tmp_path / "x.png"],
        "unreadable": inpaint + ["--image", files["broken"], "--mask", files["mask"]],
        "no-file": inpaint + ["--image", tmp_path / "nope.png", "--mask", files["mask"]],
        "no-mask-file": inpaint + ["--image", files["image"], "--mask", tmp_path / "nope.png"],
        "task-mismatch": inpaint + ["--task", "upscale", "--image", files["small"]],
        "factor": inpaint + ["--upscale", "3"],
        "shipped-no-image": ["--task", "adapter", "--out", tmp_path / "x.png"],
    }[case]
    code, err = main_error(capsys, argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and needle in err[0], err[0]
    assert not (tmp_path / "x.png").exists()


def test_missing_shipped_task_demo(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(flash.cli, "DEFAULT_MODEL", tmp_path / "digits")
    code, err = main_error(capsys, ["--task", "upscale", "--image", "x.png"])
    assert code == 1 and len(err) == 1 and "digits-upscale is not built yet" in err[0]
