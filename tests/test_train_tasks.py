"""train.py on the tasks beyond text-to-image (flash/tasks.py), with tiny SD1.5-like pipelines widened by
recipes/digits_tasks_init.py: every task trains with both objectives, the widened / zero-initialised start
computes exactly the text-to-image model, the adapter objective trains the adapter alone and resumes
exactly, and the unconditional branch carries the image condition."""
import pytest
import torch

import weights
from recipes import digits_tasks_init
from train_helpers import make_images, make_tiny_sd, read_log, read_tensors, run_train

FLASH = ["--objective", "flash", "--batch-size", "2", "--K", "4", "--phase-len", "1", "--lora-rank", "4",
         "--lora-alpha", "4", "--lr", "1e-3", "--checkpoint-every", "100"]
DIFFUSION = ["--objective", "diffusion", "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "100"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return make_tiny_sd(root / "sd"), make_images(root / "data", n=6, size=16)


@pytest.fixture(scope="module")
def task_models(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("task_models")
    out = {}
    for task in ("inpaint", "upscale", "adapter"):
        assert digits_tasks_init.main(["--base", str(base[0]), "--task", task, "--out", str(root / task)]) == 0
        out[task] = root / task
    return out


@pytest.mark.parametrize("task", ["inpaint", "upscale", "adapter"])
def test_task_start_is_the_text_to_image_model(base, task_models, task):
    """Zero-initialised extra channels / a zero-output adapter: the task model starts as the base model."""
    t2i, pipe = weights.load_pipeline(base[0]), weights.load_pipeline(task_models[task])
    assert pipe.task == task
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    kw = {}
    if task == "adapter":
        kw["adapter_residuals"] = pipe.adapter(torch.rand(2, 1, 16, 16, generator=g))
        assert all(f.abs().max() == 0 for f in kw["adapter_residuals"])
    else:
        kw["concat"] = torch.randn(2, pipe.unet.config.in_channels - 4, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, 500, ctx, **kw), t2i.unet(x, 500, ctx))


@pytest.mark.parametrize("task", ["inpaint", "upscale"])
def test_concat_tasks_train_both_objectives(base, task_models, task, tmp_path):
    data = base[1]
    run_train(["--model", task_models[task], "--data", data, "--out", tmp_path / "teacher", "--steps", "2",
               *DIFFUSION])
    final = tmp_path / "teacher" / "final"
    assert weights.load_pipeline(final).task == task
    run_train(["--model", final, "--data", data, "--out", tmp_path / "flash", "--steps", "3", *FLASH])
    log = read_log(tmp_path / "flash")
    assert [r["step"] for r in log] == [0, 1, 2] and all(r["loss"] is not None for r in log)
    assert "dmd" in log[-1] and "gen" in log[-1]
    lora = read_tensors(tmp_path / "flash" / "final" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora.up" in k or "lora_B" in k)


def test_adapter_objective_trains_the_adapter_alone_and_resumes_exactly(base, task_models, tmp_path):
    data, init = base[1], task_models["adapter"]
    args = ["--model", init, "--data", data, *DIFFUSION]
    run_train([*args, "--out", tmp_path / "straight", "--steps", "3"])
    run_train([*args, "--out", tmp_path / "resumed", "--steps", "2"])
    run_train([*args, "--out", tmp_path / "resumed", "--steps", "3", "--resume"])
    start, trained = weights.load_pipeline(init), weights.load_pipeline(tmp_path / "straight" / "final")
    assert trained.task == "adapter"
    for (name, a), b in zip(start.unet.state_dict().items(), trained.unet.state_dict().values()):
        assert torch.equal(a, b), f"the frozen UNet changed: {name}"
    moved = [n for n, p in trained.adapter.state_dict().items() if not torch.equal(p, start.adapter.state_dict()[n])]
    assert "adapter.conv_in.weight" in moved
    a = read_tensors(tmp_path / "straight" / "checkpoint-last" / "adapter" / "diffusion_pytorch_model.safetensors")
    b = read_tensors(tmp_path / "resumed" / "checkpoint-last" / "adapter" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Distillation with the trained adapter frozen: only LoRA tensors are saved.
    run_train(["--model", tmp_path / "straight" / "final", "--data", data, "--out", tmp_path / "flash",
               "--steps", "2", *FLASH])
    lora = read_tensors(tmp_path / "flash" / "checkpoint-last" / "trainable.safetensors")
    assert lora and all("lora" in k for k in lora)


def test_unconditional_branch_keeps_the_image_condition():
    from flash.conditioning import cond_map, with_image_condition
    uncond = {"context": torch.zeros(1, 3, 8)}
    cond = {"context": torch.ones(4, 3, 8), "concat": torch.randn(4, 5, 2, 2),
            "adapter_residuals": [torch.randn(4, 6, 2, 2)]}
    u = with_image_condition(uncond, cond)
    assert u["context"].shape == (4, 3, 8) and u["context"].abs().max() == 0
    assert u["concat"] is cond["concat"] and u["adapter_residuals"] is cond["adapter_residuals"]
    both = cond_map(lambda a, b: torch.cat([a, b]), cond, u)
    assert both["adapter_residuals"][0].shape == (8, 6, 2, 2)


def test_a_text_to_image_denoiser_in_a_task_pipeline_is_refused(base, tmp_path):
    """A pipeline folder that says inpainting but holds a 4-channel UNet: one line, exit 2."""
    import json
    import shutil
    folder = tmp_path / "bad"
    shutil.copytree(base[0], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FlashUpscalePipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    proc = run_train(["--model", folder, "--data", base[1], "--out", tmp_path / "o", "--steps", "1", *DIFFUSION],
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "needs a denoiser with 8 input channels" in proc.stderr
