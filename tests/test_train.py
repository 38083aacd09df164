"""train.py end to end on a tiny SD1.5-like pipeline (saved by diffusers, the oracle) and 8 tiny images, on CPU.

The loss functions themselves are pinned by tests/test_losses.py; here: torchrun with 2 ranks (gloo) keeps
the ranks bit-identical and equals one process with twice the batch (and gradient accumulation); SIGKILL at
a random step or during a checkpoint write, then --resume, ends at exactly the weights of an uninterrupted
run; SIGTERM saves; a LoRA distillation step holds one copy of the base weights; the JSONL log has every
loss term and the phases switch at the configured steps; non-finite steps are skipped; bad input gives one
line. Runs are 4 to 6 steps of K = 4 with a phase length of 1 or 2 batches, so every phase and loss occurs.
"""
import gc
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

import train
from flash.conditioning import encode_text
from flash.data import load_batch, training_set
from flash.losses import PHASES
from train_helpers import make_images, make_tiny_pixart, make_tiny_sd, make_tiny_sdxl, read_log, read_tensors, run_train

BASE = ["--K", "4", "--lr", "1e-3", "--lora-rank", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_tiny_sd(root / "pipe"), make_images(root / "data")


def flash_args(tiny, out, *extra):
    pipe, data = tiny
    return ["--model", pipe, "--data", data, "--out", out, *BASE, *extra]


def close(a, b, tol):
    return a is None and b is None or abs(a - b) <= tol * max(1.0, abs(a))


# ---------------------------------------------------------------------------------------------------
# DDP: in sync, and 2 ranks x batch b == 1 process x batch 2b == 1 process x batch b x accumulation 2


def test_two_ranks_equal_one_process_with_twice_the_batch(tiny, tmp_path):
    common = ["--steps", "4", "--phase-len", "1", "--check-sync"]
    ddp = tmp_path / "ddp"
    run_train(flash_args(tiny, ddp, *common, "--batch-size", "1"), nproc=2)
    single = tmp_path / "single"
    run_train(flash_args(tiny, single, *common, "--batch-size", "2", "--sample-every", "4"))
    accum = tmp_path / "accum"
    run_train(flash_args(tiny, accum, *common, "--batch-size", "1", "--grad-accum", "2"))

    logs = {name: read_log(tmp_path / name) for name in ("ddp", "single", "accum")}
    for row in logs["ddp"]:       # the weights of both ranks, hashed after every optimiser step
        assert len(row["rank_hashes"]) == 2 and row["rank_hashes"][0] == row["rank_hashes"][1], row
    # The JSONL log: every loss term, the phase switching each batch (phase length 1), the draws.
    assert [r["phase"] for r in logs["single"]] == [0, 1, 2, 3]
    assert [r["loss_weights"] for r in logs["single"]] == [[p.distill, p.dmd, p.adv] for p in PHASES]
    for r in logs["single"]:
        assert {"distill", "gen", "disc", "t", "w", "lr"} <= set(r) and ("dmd" in r) == (r["phase"] > 0)
        assert r["t"] == [999, 749, 499, 249][r["i"]] and 3 <= r["w"] <= 13
    for a, b, c in zip(logs["ddp"], logs["single"], logs["accum"]):
        assert (a["i"], a["w"]) == (b["i"], b["w"]) == (c["i"], c["w"])
        for term in ("distill", "dmd", "gen", "disc", "loss"):
            assert close(a.get(term), b.get(term), 1e-5) and close(c.get(term), b.get(term), 1e-5), (term, a, b, c)
    # Weights after 4 AdamW steps at lr 1e-3 (Adam turns fp32 rounding of near-zero gradients into up to
    # 2 lr of update, so the head's tolerance is lr; the adapter agrees much more tightly).
    for name, tol in (("trainable", 1e-4), ("discriminator", 1e-3)):
        want = read_tensors(single / "checkpoint-last" / f"{name}.safetensors")
        for other in (ddp, accum):
            got = read_tensors(other / "checkpoint-last" / f"{name}.safetensors")
            assert max((got[k] - want[k]).abs().max().item() for k in want) < tol, (name, other)
    lora = read_tensors(single / "checkpoint-last" / "trainable.safetensors")
    assert min(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4    # moved from 0
    # The sample grid: 4 prompts x (student 1, 2, 4 steps, teacher) of 16 px images.
    from PIL import Image
    assert Image.open(single / "samples" / "step-0000004.png").size == (4 * 16, 4 * 16)


# ---------------------------------------------------------------------------------------------------
# Kill and resume


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted 6-step run (phase length 2) checkpointing every step: (out folder, its arguments)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    args = lambda o: flash_args(tiny, o, "--steps", "6", "--phase-len", "2", "--batch-size", "2",  # noqa: E731
                                "--checkpoint-every", "1")
    run_train(args(out))
    return out, args


def assert_same_result(out, reference_out):
    for name in ("trainable", "discriminator"):
        want = read_tensors(reference_out / "checkpoint-last" / f"{name}.safetensors")
        got = read_tensors(out / "checkpoint-last" / f"{name}.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert read_log(out) == read_log(reference_out)
    assert [r["phase"] for r in read_log(out)] == [0, 0, 1, 1, 2, 2]      # switching every 2 batches


def test_lora_snapshot_loads_in_diffusers_and_flash(tiny, reference):
    import weights
    from diffusers import StableDiffusionPipeline
    from flash.lora import load_lora
    final = reference[0] / "final"
    theirs = StableDiffusionPipeline.from_pretrained(tiny[0], safety_checker=None)
    theirs.load_lora_weights(final)
    ours, base = weights.load_pipeline(tiny[0]), weights.load_pipeline(tiny[0])
    load_lora(ours.unet, final)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    with torch.no_grad():
        want, got = theirs.unet(x, 500, context).sample, ours.unet(x, 500, context)
        assert (want - got).abs().max().item() < 1e-5 < (want - base.unet(x, 500, context)).abs().max().item()


def test_sigkill_at_a_random_step_then_resume_is_exact(reference, tmp_path):
    ref, args = reference
    k = random.Random(time.time_ns()).randint(1, 4)
    proc = run_train(args(tmp_path), fault=f"kill-step:{k}", check=False)
    assert proc.returncode == -signal.SIGKILL, (k, proc.stderr[-2000:])
    assert len(read_log(tmp_path)) == k                     # killed inside step k, after k logged steps
    run_train(args(tmp_path) + ["--resume"])
    assert_same_result(tmp_path, ref)


def test_kill_during_a_checkpoint_write_never_corrupts_the_latest(reference, tmp_path):
    ref, args = reference
    proc = run_train(args(tmp_path), fault="kill-write:3", check=False)      # writing the checkpoint after 3 steps
    assert proc.returncode == -signal.SIGKILL
    last = tmp_path / "checkpoint-last"
    assert train.json.loads((last / "state.json").read_text())["step"] == 2   # the previous one, complete
    for f in ("trainable", "discriminator", "pytorch_lora_weights"):
        read_tensors(last / f"{f}.safetensors")
    proc = run_train(args(tmp_path) + ["--resume"], fault="kill-swap:4", check=False)   # between the renames
    assert proc.returncode == -signal.SIGKILL and not last.exists()
    assert train.json.loads((tmp_path / "checkpoint-old" / "state.json").read_text())["step"] == 3
    run_train(args(tmp_path) + ["--resume"])
    assert_same_result(tmp_path, ref)


def test_sigterm_saves_a_checkpoint_and_exits(tiny, tmp_path):
    proc = run_train(flash_args(tiny, tmp_path, "--steps", "10000", "--checkpoint-every", "10000"), background=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    state = train.json.loads((tmp_path / "checkpoint-last" / "state.json").read_text())
    assert state["step"] == len(read_log(tmp_path)) >= 2


# ---------------------------------------------------------------------------------------------------
# One copy of the base weights


def storages_holding(weights):
    """For each named tensor, the number of distinct live storages (found through gc), other than its own,
    that hold an equal tensor."""
    own = {w.untyped_storage().data_ptr() for w in weights.values()}
    by_shape = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # gc also returns deprecated module attributes
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.untyped_storage().data_ptr() not in own:
                by_shape.setdefault(tuple(obj.shape), []).append(obj)
    return {name: len({t.untyped_storage().data_ptr() for t in by_shape.get(tuple(w.shape), [])
                       if t.dtype == w.dtype and torch.equal(t, w)}) for name, w in weights.items()}


@pytest.mark.parametrize("full", [False, True])
def test_one_copy_of_the_base_weights_in_a_lora_step(tiny, tmp_path, monkeypatch, full):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # see train_helpers.run_train: 2-thread ops stall on this shared machine
    try:
        one_copy_check(tiny, tmp_path, monkeypatch, full)
    finally:
        torch.set_num_threads(threads)


def one_copy_check(tiny, tmp_path, monkeypatch, full):
    args = train.parse_args([str(a) for a in flash_args(tiny, tmp_path, "--batch-size", "2", "--phase-len", "1")]
                            + (["--full-finetune"] if full else []))
    base = read_tensors(Path(tiny[0]) / "unet" / "diffusion_pytorch_model.safetensors")
    base = {k: v for k, v in base.items() if v.numel() > 16}   # tiny tensors (zeros, ones) may repeat by chance
    m = train.build_models(args, torch.device("cpu"))
    ptrs = {n: p.data_ptr() for n, p in m.denoiser.named_parameters() if n in base}
    seen = {}
    real_pair = train.teacher_pair

    def counting_pair(*a, **kw):       # count while the teacher is running, mid-step
        if not seen:
            seen.update(storages_holding(base))
        return real_pair(*a, **kw)
    monkeypatch.setattr(train, "teacher_pair", counting_pair)
    images, captions = load_batch(training_set(args.data, args.resolution), args.seed, range(2))
    draws = train.sample_draws(args, range(2), m.latent_shape, "cpu")
    cond = encode_text(m.pipe, captions, args.resolution)
    terms, loss, disc = train.flash_micro_batch(m, args, images, cond, draws, 0, 5.0, 5.0, m.phases[3])
    (loss + disc).backward()
    assert set(terms) == {"distill", "dmd", "gen", "disc"}
    assert seen and set(seen.values()) == {2 if full else 1}, seen      # the full fine-tune has a teacher copy
    assert {n: p.data_ptr() for n, p in m.denoiser.named_parameters() if n in base} == ptrs
    if not full:
        assert all(p.grad is None for n, p in m.denoiser.named_parameters() if n in base)
        assert all(p.grad is not None for n, p in m.denoiser.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------------
# Non-finite steps, errors, the diffusion objective, other families


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(tiny, tmp_path):
    proc = run_train(flash_args(tiny, tmp_path, "--steps", "6", "--phase-len", "1", "--check-sync",
                                "--max-nonfinite", "2"), fault="nan:1,2", check=False)
    assert proc.returncode == 1 and "2 steps in a row had a non-finite loss" in proc.stderr
    log = read_log(tmp_path)
    assert [r.get("skipped") is not None for r in log] == [False, True, True]
    assert log[1]["loss"] is None and log[0]["rank_hashes"] == log[1]["rank_hashes"] == log[2]["rank_hashes"]
    assert train.json.loads((tmp_path / "checkpoint-last" / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("bad", [
    ["--model", "{tmp}/nope"], ["--data", "{tmp}/nope"], ["--steps", "0"], ["--mode-weights", "1,2", "3", "4", "5"],
    ["--loss-weights", "0,0,0", "1,1,1", "1,1,1", "1,1,1"], ["--resume"], ["--K", "2"], ["--objective", "gan"]])
def test_bad_input_gives_one_line(tiny, tmp_path, capsys, bad):
    pipe, data = tiny
    args = {"--model": str(pipe), "--data": str(data), "--out": str(tmp_path), "--steps": "1"}
    extra = [b.format(tmp=tmp_path) for b in bad]
    if extra[0] in args and len(extra) == 2:
        args[extra[0]] = extra[1]
        extra = []
    with pytest.raises(SystemExit) as e:
        train.main([x for kv in args.items() for x in kv] + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("train.py: error:") and "\n" not in err, err


def test_diffusion_objective_full_finetune_resumes_and_writes_a_pipeline(tiny, tmp_path):
    import weights
    pipe, data = tiny
    args = lambda out: ["--model", pipe, "--data", data, "--out", out, "--objective", "diffusion",  # noqa: E731
                        "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1"]
    run_train(args(tmp_path / "a"))
    assert run_train(args(tmp_path / "b"), fault="kill-step:1", check=False).returncode == -signal.SIGKILL
    run_train(args(tmp_path / "b") + ["--resume"])
    unet = "checkpoint-last/unet/diffusion_pytorch_model.safetensors"
    want, got = read_tensors(tmp_path / "a" / unet), read_tensors(tmp_path / "b" / unet)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    log = read_log(tmp_path / "a")
    assert len(log) == 3 and all(r["diffusion"] > 0 for r in log) and "distill" not in log[0]
    ours, before = weights.load_pipeline(tmp_path / "b" / "final"), weights.load_pipeline(pipe)
    assert all(not torch.equal(a, b) for a, b in zip(ours.unet.parameters(), before.unet.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "pixart"])
def test_other_families_train_and_resume(tmp_path, family):
    folder = (make_tiny_sdxl if family == "sdxl" else make_tiny_pixart)(tmp_path / "pipe")
    data = make_images(tmp_path / "data")
    args = ["--model", folder, "--data", data, "--out", tmp_path / "out", *BASE, "--resolution", "16", "--steps", "4",
            "--phase-len", "1", "--batch-size", "2", "--checkpoint-every", "1", "--gradient-checkpointing"]
    run_train(args)
    reference = read_tensors(tmp_path / "out" / "checkpoint-last" / "trainable.safetensors")
    run_train([str(a).replace(str(tmp_path / "out"), str(tmp_path / "again")) for a in args], fault="kill-step:2",
              check=False)
    run_train([str(a).replace(str(tmp_path / "out"), str(tmp_path / "again")) for a in args] + ["--resume"])
    got = read_tensors(tmp_path / "again" / "checkpoint-last" / "trainable.safetensors")
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert [sorted(k for k in ("distill", "dmd", "gen", "disc") if k in r) for r in read_log(tmp_path / "out")][-1] \
        == ["disc", "distill", "dmd", "gen"]
    if family == "pixart":     # released as PEFT: adapter_config.json + adapter_model.safetensors
        assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()
