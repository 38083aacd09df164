"""The shipped default (weights/digits/, built by recipes/digits.sh) and the recipe's own pieces.

- `recipes/train_vae.py`: its KL term equals torch.distributions' KL; a short run trains the VAE only and
  writes scaling_factor = 1 / std of the encoded latents into the saved config (diffusers reads it back).
- The shipped student: 100 images at 4 Flash steps (the eval.py protocol: caption_for(i % 10), seeds 0..99),
  prompt accuracy of the shipped digit classifier above a floor set a bit below the measured value (README).
- diffusers' StableDiffusionPipeline loads weights/digits offline, and its UNet and VAE give our outputs.
- `python sample.py --steps 4` with no --model writes the ten digits with the shipped LoRA.
- `recipes/digits.sh --quick` runs every stage end to end on a few steps (~35 s here, so it runs in CI), then
  `recipes/digits_tasks.sh --quick` builds the three task demos on top of it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import train_vae
from train_helpers import ROOT, make_images, make_tiny_sd

SHIPPED = ROOT / "weights" / "digits"
LORA = SHIPPED / "flash_lora.safetensors"
# Measured: 99 / 100 images at 4 steps, fp32 CPU (98.5% over the README's 1000); the floor leaves room for
# BLAS rounding flipping a few borderline digits, and fails if the shipped weights or sampler regress.
STUDENT_ACCURACY_FLOOR = 0.93
shipped = pytest.mark.skipif(not LORA.is_file(), reason="weights/digits not built (recipes/digits.sh)")


def test_vae_kl_term_is_the_gaussian_kl():
    vae = make_vae()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    terms, loss, recon = train_vae.vae_loss(vae, x, torch.zeros(3, 4, 8, 8), kl_weight=0.5)
    post = vae.encode(x)
    q = torch.distributions.Normal(post.mean, post.std)
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(terms["kl"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon, vae.decode(post.mean))           # zero noise: the posterior mean
    torch.testing.assert_close(loss, terms["l1"] + terms["l2"] + 0.5 * terms["kl"])


def make_vae():
    from flash.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                   norm_num_groups=8, sample_size=16))


def test_vae_objective_trains_the_vae_and_sets_the_latent_scale(tmp_path):
    from diffusers import AutoencoderKL
    from flash.data import training_set
    from weights import load_pipeline
    pipe_dir, data = make_tiny_sd(tmp_path / "pipe"), make_images(tmp_path / "data", n=8)
    out = tmp_path / "run"
    train_vae.main(["--model", str(pipe_dir), "--data", str(data), "--out", str(out),
                    "--steps", "6", "--batch-size", "4", "--lr", "1e-3", "--kl-weight", "1e-3"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all({"l1", "l2", "kl", "loss"} <= set(r) for r in log)
    assert log[-1]["l1"] < log[0]["l1"]                       # it learns (8 images, 6 steps at 1e-3)
    before, after = load_pipeline(pipe_dir), load_pipeline(out / "final")
    changed = [not torch.equal(p, q) for p, q in zip(before.vae.parameters(), after.vae.parameters())]
    assert all(changed)
    for p, q in zip(before.unet.parameters(), after.unet.parameters()):   # the rest is untouched
        assert torch.equal(p, q)
    # the saved scale makes the training latents unit-variance (measured here with other posterior noise)
    ds = training_set(str(data), 16)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        z = after.vae.scale_latents(after.vae.encode(images).sample(torch.Generator().manual_seed(9)))
    scale = after.vae.config.scaling_factor
    assert scale != before.vae.config.scaling_factor and 0.8 < z.std().item() < 1.25, (scale, z.std())
    assert AutoencoderKL.from_pretrained(out / "final" / "vae").config.scaling_factor == pytest.approx(scale)


@shipped
def test_shipped_student_prompt_accuracy():
    from flash import evaluate as evaluation
    import weights
    from flash.lora import load_lora
    from flash.metrics import load_digit_classifier, prompt_accuracy
    pipe = weights.load_pipeline(SHIPPED, dtype=torch.float32)
    load_lora(pipe.denoiser, LORA, fuse=True)
    row = evaluation.Row("student", "flash", 4, 0.0, student=True)
    images, nfe, _ = evaluation.generate_row(pipe, row, 100, seed=0, batch=50, progress=False)
    labels, _ = evaluation.prompts_for(100)
    acc = prompt_accuracy(images * 2 - 1, torch.tensor(labels), load_digit_classifier())
    assert nfe == 4 and images.shape == (100, 3, 32, 32)
    assert acc >= STUDENT_ACCURACY_FLOOR, f"student prompt accuracy {acc:.2f} < {STUDENT_ACCURACY_FLOOR}"


@shipped
def test_shipped_student_bf16_matches_fp32():
    """The CPU fast path's dtype (flash/cpu.py) against fp32 on the shipped student, same seed: per-image PSNR
    measured at min 42.6 / mean 51.5 dB over 100 images (different, not identical: 100 dB would mean no bf16
    ran); the bounds leave ~7 dB of room."""
    import weights
    from flash.data import caption_for
    from flash.evaluate_tasks import psnr
    from flash.lora import load_lora
    from flash.pipeline import generate
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = weights.load_pipeline(SHIPPED, dtype=dtype)
        load_lora(pipe.denoiser, LORA, fuse=True)
        images[dtype] = generate(pipe, [caption_for(d % 10) for d in range(100)], steps=4, progress=False)
    p = psnr(images[torch.bfloat16], images[torch.float32])
    assert p.min() > 35 and 45 < p.mean() < 90, (p.min().item(), p.mean().item())


@shipped
def test_diffusers_loads_the_shipped_folder():
    from diffusers import StableDiffusionPipeline
    import weights
    ref = StableDiffusionPipeline.from_pretrained(SHIPPED, local_files_only=True).to(torch.float32)
    ours = weights.load_pipeline(SHIPPED, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 250])
    ids = ref.tokenizer(["a handwritten digit seven", ""], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = ref.text_encoder(ids)[0]
        expected = ref.unet(x, t, encoder_hidden_states=ctx).sample
        got = ours.unet(x, t, context=ctx)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.vae.decode(x), ref.vae.decode(x).sample, rtol=1e-4, atol=1e-4)
    assert ref.vae.config.scaling_factor == pytest.approx(ours.vae.config.scaling_factor)
    assert ref.vae.config.scaling_factor != 1.0        # set by the recipe's VAE stage


@shipped
def test_sample_default_writes_the_ten_digits(tmp_path):
    from PIL import Image
    out = tmp_path / "digits.png"
    r = subprocess.run([sys.executable, "sample.py", "--steps", "4", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as img:
        assert img.size == (5 * 32, 2 * 32)
        assert "flash_lora.safetensors" in img.text["lora"] and img.text["prompt"].count("\n") == 9


def test_recipe_quick_mode_runs_end_to_end(tmp_path):
    env = {**os.environ, "RUN": str(tmp_path / "run"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    r = subprocess.run(["bash", "recipes/digits.sh", "--quick"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "run"
    times = (run / "times.txt").read_text().split("\n")
    assert [line.split()[0] for line in times if line] == ["init", "vae", "teacher", "teacher2", "flash",
                                                            "ship", "picture", "eval"]
    assert (run / "digits" / "flash_lora.safetensors").is_file()
    assert (run / "digits" / "model_index.json").is_file() and (run / "samples.png").is_file()
    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("dpm++2m", 25), ("dpm++2m", 4), ("flash", 1),
                                                          ("flash", 2), ("flash", 4)]
    # The task demos on top of it (recipes/digits_tasks.sh --quick), from the quick teacher and shipped folder.
    tasks = tmp_path / "tasks"
    env.update(RUN=str(tasks), BASE=str(run / "teacher2" / "final"), SHIPPED_BASE=str(run / "digits"))
    r = subprocess.run(["bash", "recipes/digits_tasks.sh", "--quick"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    stages = [" ".join(line.split()[:2]) for line in (tasks / "times.txt").read_text().splitlines()]
    assert stages == [f"{t} {s}" for t in ("inpaint", "upscale", "adapter")
                      for s in ("init", "teacher", "flash", "ship", "picture", "eval")]
    for t in ("inpaint", "upscale", "adapter"):
        index = json.loads((tasks / "weights" / f"digits-{t}" / "model_index.json").read_text())
        assert Path(tasks / "weights" / f"digits-{t}", index["flash_base"]).resolve() == (run / "digits").resolve()
        assert json.loads((tasks / t / "eval.json").read_text())["task"] == t
    assert (tasks / "tasks.png").is_file()


TASKS_SHIPPED = pytest.mark.skipif(
    not all((ROOT / "weights" / f"digits-{t}" / "flash_lora.safetensors").is_file() for t in ("inpaint", "upscale", "adapter")),
    reason="weights/digits-{inpaint,upscale,adapter} not built (recipes/digits_tasks.sh)")


@TASKS_SHIPPED
@shipped
def test_shipped_task_students():
    """The shipped task students at 4 Flash steps on 50 held-out digits (eval.py --task's inputs): prompt
    accuracy, and each task's own measure, above floors set below the 500-image values of docs/results.md (inpaint
    99.4%; upscale 4x PSNR 21.4 dB vs bicubic 16.8; adapter edge F1 0.825 vs 0.579 for another digit of the
    same class)."""
    from flash import evaluate_tasks as eval_tasks
    import weights
    from flash.lora import load_lora
    from flash.metrics import load_digit_classifier, prompt_accuracy
    from flash.tasks import edge_agreement, edge_map
    classifier = load_digit_classifier()
    row = eval_tasks.TaskRow("student", "flash", 4, 0.0, student=True)
    for task, factor in (("inpaint", 2), ("upscale", 4), ("adapter", 2)):
        folder = ROOT / "weights" / f"digits-{task}"
        pipe = weights.load_pipeline(folder)
        load_lora(pipe.denoiser, folder / "flash_lora.safetensors", fuse=True)
        inputs = eval_tasks.make_inputs(task, 50, factor=factor)
        images, nfe, _ = eval_tasks.generate_row(pipe, row, inputs, progress=False)
        original = (inputs.images + 1) / 2
        assert nfe == 4 and images.shape == (50, 3, 32, 32)
        assert prompt_accuracy(images * 2 - 1, torch.tensor(inputs.labels), classifier) >= 0.9, task
        if task == "upscale":
            bicubic = eval_tasks.psnr(eval_tasks.upsample(inputs.kwargs["image"] * 2 - 1, 32) / 2 + 0.5, original)
            assert eval_tasks.psnr(images, original).mean() > bicubic.mean() + 2
        if task == "adapter":
            f1 = edge_agreement(edge_map(images * 2 - 1), inputs.kwargs["adapter_image"]).mean()
            same_class = edge_agreement(edge_map(inputs.same_class), inputs.kwargs["adapter_image"]).mean()
            assert f1 > same_class + 0.15, (f1, same_class)
        if task == "inpaint":       # outside the hole the output redraws the given digit
            keep = 1 - inputs.kwargs["mask"]
            assert eval_tasks.psnr(images, original, keep).mean() > 17     # measured 19.2
