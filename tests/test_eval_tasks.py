"""eval.py --task (flash/evaluate_tasks.py) on tiny random task pipelines (recipes/digits_init.py's small
digits pipeline widened by recipes/digits_tasks_init.py, random weights: the test checks the protocol, not
the models): the inputs made per image from its own generator (reproducible, independent of --batch), the
metrics (PSNR in the hole of the composite, PSNR of the upscaled image, edge F1), the --rows presets with a
LoRA student (NFE, bicubic baseline, teacher rows unaffected by the LoRA), and one-line errors.

Needs the digits data and the FID Inception weights, as tests/test_eval.py.
"""
import copy
import importlib
import json

import pytest
import torch

from flash import evaluate, evaluate_tasks
from flash.data import Digits, caption_for
from flash.lora import inject_lora, save_lora
from flash.tasks import downsample, edge_map, upsample
from helpers import needs_data, task_pipeline
from recipes.digits_init import build as build_digits
from weights.save import save_pipeline

eval_cli = importlib.import_module("eval")          # the script; `import eval` would shadow the builtin

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{task: folder} with a random LoRA (lora.safetensors) beside each pipeline."""
    root = tmp_path_factory.mktemp("evaluate_tasks")
    folders = {}
    for task in ("inpaint", "upscale", "adapter", "text-to-image"):
        pipe = build_digits(seed=1, preset="small") if task == "text-to-image" else task_pipeline(task)
        save_pipeline(pipe, root / task / "pipe")
        folders[task] = root / task
        unet = copy.deepcopy(pipe.unet)
        inject_lora(unet, rank=2)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        save_lora(unet, root / task / "lora.safetensors")
    return folders


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CACHE_DIR", tmp_path / "cache")


def run_json(capsys, tmp_path, *argv):
    path = tmp_path / "out.json"
    rc = eval_cli.main([*map(str, argv), "--no-progress", "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1, out       # header, separator, rows: one width
    return json.loads(path.read_text()), out


# -- inputs and generation -----------------------------------------------------------------------------

@needs_data
def test_inputs_are_the_held_out_digits_with_per_image_masks():
    a = evaluate_tasks.make_inputs("inpaint", 6, seed=3)
    test = Digits("test")
    assert torch.equal(a.images, test.images[:6]) and a.labels == test.labels[:6].tolist()
    assert a.prompts == [caption_for(label) for label in a.labels] and a.prompts[0].startswith("a handwritten digit")
    mask, image = a.kwargs["mask"], a.kwargs["image"]
    assert mask.shape == (6, 1, 32, 32) and image.shape == (6, 3, 32, 32)
    assert torch.equal(image, (test.images[:6] + 1) / 2)
    assert len({m.sum().item() for m in mask}) > 1                       # one box per image, not one for all
    # Image i's mask depends only on (seed, i): the first 3 of a 3-image run are the same.
    assert torch.equal(evaluate_tasks.make_inputs("inpaint", 3, seed=3).kwargs["mask"], mask[:3])
    assert not torch.equal(evaluate_tasks.make_inputs("inpaint", 3, seed=4).kwargs["mask"], mask[:3])
    # The generator goes on from after the mask draw (inpaint), or from its seed (nothing drawn).
    g = torch.Generator().manual_seed(evaluate.image_seed(3, 0))
    assert not torch.equal(a.states[0], g.get_state())
    up = evaluate_tasks.make_inputs("upscale", 2, seed=3, factor=4)
    assert torch.equal(up.states[0], g.get_state()) and up.kwargs["upscale"] == 4
    assert torch.allclose(up.kwargs["image"], (downsample(test.images[:2], 4) + 1) / 2)
    ad = evaluate_tasks.make_inputs("adapter", 2)
    assert torch.equal(ad.kwargs["adapter_image"], edge_map(test.images[:2]))
    # The same-class baseline: another held-out digit of the same label, the next one in order.
    j = [k for k in range(1, 500) if test.labels[k] == test.labels[0]][0]
    assert torch.equal(a.same_class[0], test.images[j])
    assert all(not torch.equal(a.same_class[i], a.images[i]) for i in range(6))


@needs_data
def test_outputs_do_not_depend_on_the_batch():
    """inpaint: the per-image generators draw the mask, the noise, the masked-image posterior sample and
    lcm's re-noising."""
    task = "inpaint"
    pipe = task_pipeline(task)
    inputs = evaluate_tasks.make_inputs(task, 4, seed=2)
    row = evaluate_tasks.TaskRow("t", "lcm", 2, 0.0)        # lcm re-noises: the per-image generators feed it too
    a, nfe, _ = evaluate_tasks.generate_row(pipe, row, inputs, batch=4, progress=False)
    b, _, _ = evaluate_tasks.generate_row(pipe, row, inputs, batch=3, progress=False)
    other = evaluate_tasks.make_inputs(task, 4, seed=5)
    c, _, _ = evaluate_tasks.generate_row(pipe, row, other, batch=4, progress=False)
    assert nfe == 2 and a.shape == (4, 3, 32, 32)
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-2


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1                                             # MSE 0.01 -> 20 dB
    y[1, :, :2] = 1                                         # only in the top half of image 1
    assert torch.allclose(evaluate_tasks.psnr(y, x)[0], torch.tensor(20.0))
    top = torch.zeros(2, 1, 4, 4)
    top[:, :, :2] = 1
    assert torch.allclose(evaluate_tasks.psnr(y, x, top), torch.tensor([20.0, 0.0]))        # MSE 1 in the hole
    assert torch.allclose(evaluate_tasks.psnr(y, x, 1 - top)[1], torch.tensor(100.0))      # none outside: clamped


@needs_data
def test_score_uses_the_composite_and_the_conditions():
    from flash.metrics import load_digit_classifier, load_inception
    inception, classifier = load_inception(), load_digit_classifier()
    real, _ = evaluate.real_digits(10)
    feats = evaluate.real_features(inception, real, "cpu")
    inputs = evaluate_tasks.make_inputs("inpaint", 4)
    original = (inputs.images + 1) / 2
    row = evaluate_tasks.TaskRow("t", "flash", 4, 0.0)
    blank = evaluate_tasks.score("inpaint", row, torch.zeros_like(original), inputs, 4, 1.0, feats, inception,
                             classifier, "cpu")
    ideal = evaluate_tasks.score("inpaint", row, original, inputs, 4, 1.0, feats, inception, classifier, "cpu")
    # Outside the hole the composite is the original: a fill with the original itself scores 100 dB.
    assert ideal.psnr == pytest.approx(100.0) and blank.psnr < 20 and ideal.fid < blank.fid
    assert ideal.nfe_per_image == 4 and ideal.seconds_per_image == 0.25 and ideal.task == "inpaint"

    up = evaluate_tasks.make_inputs("upscale", 4, factor=2)
    bicubic = (upsample(up.kwargs["image"] * 2 - 1, 32) + 1) / 2
    r = evaluate_tasks.score("upscale", row, bicubic, up, 0, 1.0, feats, inception, classifier, "cpu")
    assert r.psnr == pytest.approx(evaluate_tasks.psnr(bicubic, original).mean().item()) and 10 < r.psnr < 40
    ad = evaluate_tasks.make_inputs("adapter", 4)
    assert evaluate_tasks.score("adapter", row, original, ad, 0, 1.0, feats, inception, classifier,
                            "cpu").edge_f1 == pytest.approx(1.0)
    assert evaluate_tasks.score("adapter", row, torch.full_like(original, 0.5), ad, 0, 1.0, feats, inception,
                            classifier, "cpu").edge_f1 == 0


# -- end to end ---------------------------------------------------------------------------------------

@needs_data
def test_inpaint_rows(models, tmp_path, capsys):
    common = ["--task", "inpaint", "--model", models["inpaint"] / "pipe", "--n", 2, "--batch", 2, "--real", 10]
    cfg, out = run_json(capsys, tmp_path, *common, "--rows", "--lora", models["inpaint"] / "lora.safetensors")
    rows = cfg["rows"]
    assert cfg["task"] == "inpaint" and cfg["n"] == 2
    assert [(r["name"], r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        ("VAE reconstruction", "vae", 0, 0), ("teacher", "dpm++2m", 25, 3), ("teacher", "dpm++2m", 4, 3),
        ("Flash student", "flash", 4, 0), ("Flash student", "flash", 2, 0)]
    assert [r["nfe_per_image"] for r in rows] == [0, 50, 8, 4, 2]
    assert all(r["psnr"] > 0 and r["edge_f1"] is None and r["factor"] is None for r in rows)
    assert out.splitlines()[0].startswith("| model | sampler | steps | CFG | NFE / image | PSNR in hole (dB) | FID |")
    assert "composites" in out and out.count("| Flash student | flash |") == 2
    # The teacher rows run with the LoRA disabled; the student rows with it fused.
    alone, _ = run_json(capsys, tmp_path, *common, "--sampler", "dpm++2m", "--steps", 4, "--guidance", 3)
    assert alone["rows"][0]["psnr"] == rows[2]["psnr"] and alone["rows"][0]["name"] == "model"
    base, _ = run_json(capsys, tmp_path, *common, "--sampler", "flash", "--steps", 4)
    assert base["rows"][0]["psnr"] != rows[3]["psnr"]


@needs_data
def test_upscale_one_row_per_factor(models, tmp_path, capsys):
    common = ["--task", "upscale", "--model", models["upscale"] / "pipe", "--n", 2, "--real", 10]
    cfg, out = run_json(capsys, tmp_path, *common, "--sampler", "flash", "--steps", 1)
    assert [(r["factor"], r["nfe_per_image"]) for r in cfg["rows"]] == [(2, 1), (4, 1)]
    assert all(r["psnr"] > 0 and r["edge_f1"] is None for r in cfg["rows"])
    assert "| factor |" in out and "| PSNR (dB) |" in out and "| 4x | 1 |" in out
    cfg, _ = run_json(capsys, tmp_path, *common, "--sampler", "flash", "--steps", 1, "--upscale", 4)
    assert cfg["rows"][0]["psnr"] != cfg["rows"][0]["fid"] and [r["factor"] for r in cfg["rows"]] == [4]


@needs_data
def test_baseline_rows(models):
    import weights
    assert [(r.name, r.sampler) for r in evaluate_tasks.readme_rows("adapter")][:3] == [
        ("same class, other digit", "real"), ("VAE reconstruction", "vae"), ("teacher", "dpm++2m")]
    assert [(r.sampler, r.factor) for r in evaluate_tasks.readme_rows("upscale", factors=[2, 4])][::5] == [
        ("vae", None), ("flash", 2), ("flash", 4)]
    assert [(r.sampler, r.factor) for r in evaluate_tasks.readme_rows("upscale", factors=[2, 4])][1::5] == [
        ("bicubic", 2), ("bicubic", 4)]
    pipe = weights.load_pipeline(models["adapter"] / "pipe")
    inputs = evaluate_tasks.make_inputs("adapter", 3)
    out, nfe, _ = evaluate_tasks.generate_row(pipe, evaluate_tasks.readme_rows("adapter")[0], inputs, progress=False)
    assert nfe == 0 and torch.equal(out, (inputs.same_class + 1) / 2)
    inputs = evaluate_tasks.make_inputs("upscale", 3, factor=4)
    vae_row = evaluate_tasks.readme_rows("upscale", factors=[4])[0]
    out, nfe, _ = evaluate_tasks.generate_row(pipe, vae_row, inputs, progress=False)
    with torch.no_grad():
        expected = (pipe.vae.decode(pipe.vae.encode(inputs.images).mean).clamp(-1, 1) + 1) / 2
    assert nfe == 0 and torch.allclose(out, expected)
    row = evaluate_tasks.readme_rows("upscale", factors=[4])[1]
    out, nfe, seconds = evaluate_tasks.generate_row(pipe, row, inputs, progress=False)
    assert nfe == 0 and torch.allclose(out, (upsample(inputs.kwargs["image"] * 2 - 1, 32) + 1) / 2)
    result = evaluate_tasks.TaskResult(row.name, row.sampler, row.steps, row.guidance, 3, nfe, 50.0, 0.5,
                                   seconds / 3, 3 / seconds, "upscale", 4, psnr=21.0)
    text = evaluate_tasks.table("upscale", [result], 0.98, 10)
    assert "| bicubic | bicubic | - | - | 4x | 0 | 21.00 | 50.00 | 50.0% |" in text
    assert len({line.count("|") for line in text.splitlines() if line.startswith("|")}) == 1


@needs_data
def test_adapter_single_row(models, tmp_path, capsys):
    cfg, out = run_json(capsys, tmp_path, "--task", "adapter", "--model", models["adapter"] / "pipe", "--n", 2,
                        "--real", 10, "--sampler", "ddim", "--steps", 2, "--guidance", 2)
    (row,) = cfg["rows"]
    assert row["nfe_per_image"] == 4 and 0 <= row["edge_f1"] <= 1 and row["psnr"] is None
    assert "| edge F1 |" in out.splitlines()[0] and "| model | ddim | 2 | 2 | 4 |" in out


@pytest.mark.parametrize("argv,needle", [
    (["--task", "inpaint", "--n", "501"], "--n must be <= 500"),
    (["--upscale", "2"], "--upscale sets the factor of --task upscale"),
    (["--task", "inpaint", "--upscale", "4"], "--upscale sets the factor"),
    (["--task", "upscale", "--upscale", "3"], "argument --upscale: invalid choice"),
    (["--task", "sketch"], "argument --task: invalid choice"),
    pytest.param(["--task", "inpaint", "--model", "TASK:upscale"], "a pipeline for upscale, not for inpaint",
                 marks=needs_data),              # the model is checked after the metric networks are loaded
    pytest.param(["--task", "adapter", "--model", "TASK:text-to-image"], "for text-to-image, not for adapter",
                 marks=needs_data),
    pytest.param(["--model", "TASK:inpaint"], "a pipeline for inpaint; evaluate it with --task inpaint",
                 marks=needs_data),
])
def test_errors_are_one_line(models, capsys, argv, needle):
    argv = [str(models[a[5:]] / "pipe") if a.startswith("TASK:") else a for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(models["inpaint"] / "pipe"), *argv]
    try:
        rc = eval_cli.main([*argv, "--real", "10"])
    except SystemExit as e:                          # argparse's own errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
