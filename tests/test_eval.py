"""eval.py and flash/evaluate.py end to end on a tiny random digits pipeline (recipes/digits_init.py's
architecture, random weights, so FID is large and accuracy near chance: the test checks the protocol, not
the model): the table and JSON fields, NFE counted from the denoiser calls (CFG doubles it),
reproducibility and batch independence of the per-image seeds, the --rows preset with a LoRA student, and
one-line errors.

Needs the digits data and the FID Inception weights (`python -m flash.data fetch`, `python -m flash.metrics
fetch`); the real set is cut to a few images with --real so the Inception runs on tens of images.
"""
import copy
import importlib
import json
import math

import pytest
import torch

from flash import evaluate
from flash.lora import inject_lora, save_lora
from helpers import needs_data
from recipes.digits_init import build as build_digits
from weights.save import save_pipeline

eval_cli = importlib.import_module("eval")          # the script; `import eval` would shadow the builtin

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random digits pipeline folder and a random LoRA for its UNet."""
    root = tmp_path_factory.mktemp("eval")
    pipe = build_digits(seed=1, preset="small")
    save_pipeline(pipe, root / "pipe")
    unet = copy.deepcopy(pipe.unet)
    inject_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_lora(unet, root / "lora.safetensors")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def run(capsys, *argv):
    rc = eval_cli.main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, tmp_path, *argv):
    path = tmp_path / "out.json"
    rc, out, err = run(capsys, *argv, "--json", path)
    assert rc == 0, err
    return json.loads(path.read_text()), out


@needs_data
def test_single_setting_fields_and_nfe(model, tmp_path, capsys, cache):
    common = ["--model", model / "pipe", "--n", 8, "--batch", 3, "--real", 10]
    cfg, out = run_json(capsys, tmp_path, *common, "--sampler", "ddim", "--steps", 2, "--guidance", 3)
    (row,) = cfg["rows"]
    assert row["nfe_per_image"] == 4                # 2 steps x (uncond + cond)
    assert math.isfinite(row["fid"]) and row["fid"] > 0
    assert 0 <= row["prompt_accuracy"] <= 1 and 0 <= cfg["classifier_heldout_accuracy"] <= 1
    assert row["seconds_per_image"] > 0 and row["images_per_second"] == pytest.approx(1 / row["seconds_per_image"])
    assert cfg["n"] == 8 and cfg["real"] == 10 and cfg["lora"] is None
    assert out.splitlines()[0].startswith("| model | sampler | steps | CFG | NFE / image | FID |")
    assert "| model | ddim | 2 | 3 | 4 |" in out
    assert (cache / "fid_digits_test_10_cpu.safetensors").is_file()

    # No CFG: one denoiser row per step. And a rerun (now from the cached real features) reproduces.
    plain, _ = run_json(capsys, tmp_path, *common, "--sampler", "ddim", "--steps", 2, "--guidance", 1)
    assert plain["rows"][0]["nfe_per_image"] == 2
    again, _ = run_json(capsys, tmp_path, *common, "--sampler", "ddim", "--steps", 2, "--guidance", 3)
    assert again["rows"][0]["fid"] == row["fid"]
    assert again["rows"][0]["prompt_accuracy"] == row["prompt_accuracy"]


def test_images_do_not_depend_on_the_batch(model):
    import weights
    pipe = weights.load_pipeline(model / "pipe")
    row = evaluate.Row("t", "lcm", 2, 0.0)          # lcm re-noises: the per-image generators must feed it too
    a, nfe, _ = evaluate.generate_row(pipe, row, 5, seed=7, batch=5, progress=False)
    b, _, _ = evaluate.generate_row(pipe, row, 5, seed=7, batch=2, progress=False)
    c, _, _ = evaluate.generate_row(pipe, row, 5, seed=8, batch=5, progress=False)
    assert nfe == 2 and a.shape == (5, 3, 32, 32)
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-2
    labels, prompts = evaluate.prompts_for(12)
    assert labels[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0] and prompts[7] == "a handwritten digit seven"


@needs_data
def test_readme_rows(model, tmp_path, capsys):
    common = ["--model", model / "pipe", "--n", 4, "--batch", 4, "--real", 10]
    cfg, out = run_json(capsys, tmp_path, *common, "--rows", "--lora", model / "lora.safetensors", "--guidance", 2)
    rows = cfg["rows"]
    assert [(r["name"], r["sampler"], r["steps"]) for r in rows] == [
        ("teacher", "dpm++2m", 25), ("teacher", "dpm++2m", 4),
        ("Flash student", "flash", 1), ("Flash student", "flash", 2), ("Flash student", "flash", 4)]
    assert [r["nfe_per_image"] for r in rows] == [50, 8, 1, 2, 4]
    assert [r["guidance"] for r in rows] == [2, 2, 0, 0, 0]
    assert out.count("| Flash student | flash |") == 3
    # The teacher rows run with the LoRA disabled: the same numbers as the pipeline alone.
    alone, _ = run_json(capsys, tmp_path, *common, "--sampler", "dpm++2m", "--steps", 4, "--guidance", 2)
    assert alone["rows"][0]["fid"] == rows[1]["fid"]
    # ... and the student rows with it on (fused): the 4-step student differs from the LoRA-free flash sampler.
    base, _ = run_json(capsys, tmp_path, *common, "--sampler", "flash", "--steps", 4)
    assert base["rows"][0]["fid"] != rows[4]["fid"]


@pytest.mark.parametrize("argv,needle", [
    (["--n", "0"], "--n must be >= 2"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--real", "501"], "--real must be in [2, 500]"),
    (["--seed", "4096"], "--seed must be in [0, 4096)"),
    (["--rows", "--steps", "4"], "--rows evaluates fixed samplers and steps"),
    (["--sampler", "nope"], "argument --sampler: invalid choice"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder or file"),
    (["--lora", "/no/such.safetensors"], "--lora /no/such.safetensors: no such file"),
    (["--json", "/no/such/dir/x.json"], "--json /no/such/dir/x.json: no such folder"),
    (["--device", "nonsense"], "is not a torch device"),
])
def test_errors_are_one_line(model, capsys, argv, needle):
    if "--model" not in argv:
        argv = ["--model", str(model / "pipe"), *argv]
    try:
        rc = eval_cli.main(argv)
    except SystemExit as e:                          # argparse's own errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
