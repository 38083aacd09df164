"""train.py and its data on bad input (issue 15, the training side): each case ends in one line or a safe
outcome, never a traceback, and nothing already on disk is overwritten. train.py runs as a subprocess on a
tiny SD1.5-like pipeline (tests/train_helpers.py).

- The run folder: a second run into a finished run's folder, a folder of other files, a path under a file and
  a folder inside a model (pipeline or component) are refused before any work and change nothing. What a run
  writes is readable by all (0644), final/ is swapped in whole, a log line torn by a kill is dropped.
- Bad training data: the folder is scanned once at start-up; corrupt, truncated, empty, non-image, oversized,
  folder, device and FIFO "images", an unreadable caption and bad captions.jsonl rows are skipped and counted
  in one warning line, and a run killed mid-way resumes to exactly the weights of an uninterrupted one. An
  unforeseen exception in the scan is a skip too. No captions at all: a warning.
- Image modes: 16-bit gray and RGB, palette (with a transparent entry), CMYK, gray + alpha, RGBA, EXIF rotation.
- Broken resume state: another --lora-rank, another dtype, missing tensors, a truncated or pickled resume.pt,
  a truncated or garbled state.json, a run of another model (inpaint) are refused in one line naming the file.
"""
import argparse
import io
import json
import os
import shutil
import signal
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import flash.data
from flash.checkpoint import publish_folder, start_log
from flash.data import ImageCaptionFolder, image_problem, read_image
from flash.schedule import flash_timesteps
from train_helpers import make_images, make_tiny_sd, read_log, read_tensors, run_train

ARGS = ["--K", "4", "--lr", "1e-3", "--lora-rank", "4", "--seed", "3", "--batch-size", "2", "--phase-len", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return make_tiny_sd(root / "pipe"), make_images(root / "data", n=4)


def train_args(tiny, out, *extra, data=None, model=None):
    return ["--model", model or tiny[0], "--data", data or tiny[1], "--out", out, *ARGS, *extra]


def refused(proc, *words):
    """train.py stopped with exit status 2 and one line naming `words`, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("train.py: error:") and all(w in err for w in words), err
    return err


def snapshot(folder):
    """Every file under `folder` with its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 2-step run (a checkpoint after each step)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(train_args(tiny, out, "--steps", "2", "--checkpoint-every", "1"))
    return out


def copy_of(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# 1. The run folder


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(tiny, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    refused(run_train(train_args(tiny, out, "--steps", "1"), check=False), "use --resume, or choose an empty folder")
    assert snapshot(out) == before


@pytest.mark.parametrize("where", [".", "unet", "unet/sub", "new", "component", "component/sub"])
def test_an_out_in_a_model_folder_is_refused_and_changes_nothing(tiny, tmp_path, where):
    model = copy_of(tiny[0], tmp_path)
    shutil.copytree(model / "unet", tmp_path / "component")        # a component folder on its own
    before = snapshot(tmp_path)
    out = tmp_path / where if where.startswith("component") else model / where
    refused(run_train(train_args(tiny, out, "--steps", "1"), check=False), "model folder")
    assert snapshot(tmp_path) == before and not (model / "new").exists() and not (model / "unet" / "sub").exists()


@pytest.mark.parametrize("case", ["other files", "a run file of the wrong kind", "a file", "under a file"])
def test_an_out_that_is_not_a_run_folder_is_refused(tiny, tmp_path, case):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "odd" / "log.jsonl").mkdir(parents=True)
    (tmp_path / "odd" / "log.jsonl" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me")
    out = {"other files": tmp_path / "mine", "a run file of the wrong kind": tmp_path / "odd",
           "a file": tmp_path / "file", "under a file": tmp_path / "file" / "sub"}[case]
    before = snapshot(tmp_path)
    err = refused(run_train(train_args(tiny, out, "--steps", "1", "--resume"), check=False))
    want = {"other files": "(notes.txt)", "a run file of the wrong kind": "(log.jsonl)"}.get(case, "is not a folder")
    assert want in err
    assert snapshot(tmp_path) == before


def test_start_log_records_the_scan_and_drops_a_torn_line(tmp_path, capsys):
    data = make_images(tmp_path / "data", n=2, size=8)
    (data / os.fsdecode(b"bad\xff.png")).write_text("not UTF-8 in its name, not an image")
    dataset = ImageCaptionFolder(data, size=8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with start_log(out, 2, {"data": os.fsdecode(b"path\xff")}, dataset) as log:
        log.write('{"step": 2}\n')
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["data_scan"]["images"] == 2 and config["data_scan"]["skipped"] == 1
    assert config["data_scan"]["first_skipped"][0].startswith("bad\udcff.png: not an image")
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: warning: ") and "skipped 1 of 3 images" in err and "\n" not in err


def test_a_resumed_run_keeps_its_log_replaces_final_whole_and_writes_files_readable_by_all(tiny, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "final" / "stale.txt").write_text("left by an older run")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.')                  # a line torn by a kill
    run_train(train_args(tiny, out, "--steps", "3", "--resume", "--sample-every", "3"))
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    assert sorted(p.name for p in (out / "final").iterdir()) == ["pytorch_lora_weights.safetensors"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "samples" / "step-0000003.png").is_file() and (out / "checkpoint-last" / "resume.pt").is_file()
    assert len(files) == 9 and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]          # no temporary file left


def test_publish_folder_swaps_in_a_whole_folder_or_nothing(tmp_path):
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "a").write_text("old")

    def broken(folder):
        (folder / "a").write_text("half")
        raise OSError("No space left on device")
    with pytest.raises(OSError):
        publish_folder(dest, broken)
    assert [(p.name, p.read_text()) for p in dest.iterdir()] == [("a", "old")]
    publish_folder(dest, lambda folder: (folder / "b").write_text("new"))
    assert [p.name for p in dest.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ---------------------------------------------------------------------------------------------------
# 3. Bad training files: skipped, counted, and resume stays exact


def add_bad_files(folder):
    """One file of each kind the scan must skip, beside good images; returns their names."""
    good = (folder / "img00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:len(good) // 2])
    flipped = bytearray(good)
    flipped[-20] ^= 0xFF                                   # inside the last IDAT chunk: its CRC fails
    (folder / "crc.png").write_bytes(bytes(flipped))
    (folder / "text.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    (folder / "folder.png").mkdir()
    os.symlink("/dev/zero", folder / "device.png")
    os.mkfifo(folder / "fifo.webp")
    Image.new("L", (9000, 8000)).save(folder / "huge.png")      # over MAX_PIXELS
    (folder / "badcaption.png").write_bytes(good)
    (folder / "badcaption.txt").write_bytes(b"\xff\xfe not UTF-8")
    return ["truncated.png", "crc.png", "text.png", "empty.jpg", "eps.png", "folder.png", "device.png", "fifo.webp",
            "huge.png", "badcaption.png"]


def test_bad_files_are_skipped_with_one_warning_and_a_killed_run_resumes_exactly(tiny, tmp_path):
    data = make_images(tmp_path / "data", n=4)
    bad = add_bad_files(data)
    args = lambda out: train_args(tiny, out, "--steps", "3", "--checkpoint-every", "1", data=data)  # noqa: E731
    proc = run_train(args(tmp_path / "a"))
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert "Traceback" not in proc.stderr and len(warnings) == 1, proc.stderr[-3000:]
    assert f"skipped {len(bad)} of {len(bad) + 4} images" in warnings[0] and "truncated.png" not in warnings[0] \
        and "badcaption.png" in warnings[0], warnings            # the first three by name, in sorted order
    scan = json.loads((tmp_path / "a" / "config.json").read_text())["data_scan"]
    assert scan["images"] == 4 and sorted(e.split(":")[0] for e in scan["first_skipped"]) == sorted(bad)
    assert run_train(args(tmp_path / "b"), fault="kill-step:1", check=False).returncode == -signal.SIGKILL
    run_train(args(tmp_path / "b") + ["--resume"])
    want = read_tensors(tmp_path / "a" / "checkpoint-last" / "trainable.safetensors")
    got = read_tensors(tmp_path / "b" / "checkpoint-last" / "trainable.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want) and read_log(tmp_path / "b") == read_log(tmp_path / "a")


def test_captions_jsonl_rows_that_name_no_usable_image_are_skipped(tmp_path):
    make_images(tmp_path, n=2, size=8)
    rows = [{"file": "img00.png", "text": " zero "}, {"text": "no file"}, {"file": "missing.png"}, ["img00.png", "x"],
            "a string", {"file": "img01.png", "text": 7}, {"file": "../" + tmp_path.name + "/img00.png"},
            {"file": str(tmp_path / "img00.png")}, {"file": 3}, {"file": "img01.png"},
            {"file": "img00.png", "text": None}]
    lines = [json.dumps(r).encode() for r in rows] + [b"{not json", b"", b'{"file": "img00.png", "text": "\xff"}',
                                                      b"[" * 100_000]          # nested past the recursion limit
    (tmp_path / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = ImageCaptionFolder(tmp_path, size=4)
    assert ds.items == [(tmp_path / "img00.png", "zero"), (tmp_path / "img01.png", ""), (tmp_path / "img00.png", "")]
    bad_lines = (2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15)       # 13 is blank: not an entry
    assert [name for name, _ in ds.skipped] == [f"captions.jsonl line {n}" for n in bad_lines]
    reasons = dict(ds.skipped)
    assert "no \"file\"" in reasons["captions.jsonl line 2"] and "no such file" in reasons["captions.jsonl line 3"]
    assert "outside the data folder" in reasons["captions.jsonl line 7"]
    assert "not UTF-8" in reasons["captions.jsonl line 14"] and "RecursionError" in reasons["captions.jsonl line 15"]
    again = ImageCaptionFolder(tmp_path, size=4)              # a pure function of the folder: resume sees the same
    assert (again.items, again.skipped) == (ds.items, ds.skipped)
    assert len(ds) == 3 and ds[0][1] == "zero" and ds[0][0].shape == (3, 4, 4)


def test_an_unforeseen_error_in_the_scan_is_a_skip(tmp_path, monkeypatch):
    make_images(tmp_path, n=3, size=8)

    def fails(img):
        raise struct.error("unpack requires a buffer of 4 bytes")     # what a decoder might raise
    with monkeypatch.context() as m:
        m.setattr(flash.data, "to_rgb", fails)
        assert image_problem(tmp_path / "img00.png") == "unreadable (error: unpack requires a buffer of 4 bytes)"
    real = flash.data.image_problem
    monkeypatch.setattr(flash.data, "image_problem", lambda p: 1 / 0 if p.name == "img01.png" else real(p))
    ds = ImageCaptionFolder(tmp_path, size=4)
    assert [p.name for p, _ in ds.items] == ["img00.png", "img02.png"]
    assert ds.skipped == [("img01.png", "ZeroDivisionError: division by zero")]


def test_a_folder_without_usable_images_is_one_line(tmp_path):
    (tmp_path / "a.png").write_text("text")
    (tmp_path / "b.png").mkdir()
    with pytest.raises(ValueError) as e:
        ImageCaptionFolder(tmp_path)
    assert "no images left to train on" in str(e.value) and "skipped 2 of 2" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_folder_without_captions_trains_with_a_warning(tiny, tmp_path):
    data = make_images(tmp_path / "data", n=4)
    for caption in data.glob("*.txt"):
        caption.unlink()
    proc = run_train(train_args(tiny, tmp_path / "out", "--steps", "1", data=data))
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no captions" in warnings[0] and "Traceback" not in proc.stderr
    assert not ImageCaptionFolder(tiny[1]).warnings                 # the captioned folder: no warning


# ---------------------------------------------------------------------------------------------------
# 8. Image modes


def png_rgb16(rgb, size=4):
    """A 16-bit RGB PNG (colour type 2, bit depth 16), written by hand: PIL cannot write one."""
    row = b"\0" + np.tile(np.array(rgb, ">u2"), size).tobytes()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * size)) + chunk(b"IEND", b""))


def saved(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def palette(index, transparent=None):
    img = Image.new("P", (4, 4), index)
    img.putpalette([0, 0, 0, 10, 200, 30])
    return saved(img, **({} if transparent is None else {"transparency": transparent}))


def rotated():
    img = Image.new("RGB", (8, 4), "red")
    exif = img.getexif()
    exif[0x0112] = 6                                       # orientation: rotate 90 degrees to display
    return saved(img, "JPEG", exif=exif.tobytes())


MODES = {   # name: (file bytes, expected RGB pixel, expected size)
    "16-bit gray": (saved(Image.fromarray(np.full((4, 4), 30000, np.uint16))), (117, 117, 117), (4, 4)),
    "16-bit RGB": (png_rgb16([65535, 32768, 0]), (255, 128, 0), (4, 4)),
    "palette": (palette(1), (10, 200, 30), (4, 4)),
    "palette, transparent entry": (palette(0, transparent=0), (255, 255, 255), (4, 4)),
    "CMYK JPEG": (saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0), (4, 4)),
    "gray + alpha": (saved(Image.new("LA", (4, 4), (50, 0))), (255, 255, 255), (4, 4)),
    "RGBA, opaque": (saved(Image.new("RGBA", (4, 4), (0, 0, 255, 255))), (0, 0, 255), (4, 4)),
    "float TIFF": (saved(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"), (128, 128, 128), (4, 4)),
    "EXIF rotation": (rotated(), (254, 0, 0), (4, 8)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_convert_to_the_right_rgb(tmp_path, mode):
    data, rgb, size = MODES[mode]
    assert image_problem(data) is None
    img = read_image(data)
    assert img.mode == "RGB" and img.size == size
    assert np.abs(np.array(img.getpixel((0, 0))) - rgb).max() <= 2, img.getpixel((0, 0))
    (tmp_path / "x.png").write_bytes(data)                  # and through the dataset, into [-1, 1]
    x = ImageCaptionFolder(tmp_path, size=4)[0][0]
    assert torch.allclose(x[:, 0, 0], torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1, atol=0.05)


# ---------------------------------------------------------------------------------------------------
# 6. Broken resume state


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def rewrite_trainable(last, change):
    file = last / "trainable.safetensors"
    save_file(change(read_tensors(file)), str(file))


RESUME = {   # name: (what is done to checkpoint-last, extra arguments, words of the one-line error)
    "another --lora-rank": (lambda last: None, ["--lora-rank", "8"],
                            ["trainable.safetensors", "tensors do not fit this run"]),
    "another dtype": (lambda last: rewrite_trainable(last, lambda sd: {k: v.half() for k, v in sd.items()}), [],
                      ["trainable.safetensors", "float16 in the file", "float32 here"]),
    "a missing tensor": (lambda last: rewrite_trainable(last, lambda sd: dict(list(sd.items())[1:])), [],
                         ["trainable.safetensors", "1 missing"]),
    "truncated trainable": (lambda last: truncate(last / "trainable.safetensors"), [], ["trainable.safetensors"]),
    "truncated resume.pt": (lambda last: truncate(last / "resume.pt"), [], ["resume.pt", "truncated or corrupt"]),
    "pickled resume.pt": (lambda last: torch.save({"optimizers": argparse.Namespace()}, last / "resume.pt"), [],
                          ["resume.pt"]),
    "resume.pt of other shapes": (lambda last: torch.save(
        {"optimizers": {"student": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3),
                                                   "exp_avg_sq": torch.zeros(3)}},
                                    "param_groups": torch.load(last / "resume.pt")["optimizers"]["student"]
                                    ["param_groups"]}}, "rng": {}}, last / "resume.pt"), [], ["resume.pt", "(3,)"]),
    "truncated state.json": (lambda last: truncate(last / "state.json"), [], ["state.json", "not valid JSON"]),
    "garbled state.json": (lambda last: (last / "state.json").write_text('{"step": "two", "config": []}'), [],
                           ["state.json", "not a checkpoint state"]),
    "state.json a list": (lambda last: (last / "state.json").write_text("[1, 2]"), [], ["state.json"]),
}


@pytest.mark.parametrize("case", list(RESUME))
def test_broken_resume_state_is_one_line_naming_the_file(tiny, finished, tmp_path, case):
    damage, extra, words = RESUME[case]
    out = copy_of(finished, tmp_path)
    damage(out / "checkpoint-last")
    before = snapshot(out)
    refused(run_train(train_args(tiny, out, "--steps", "3", "--resume", *extra), check=False), *words)
    assert snapshot(out) == before


def test_resuming_with_another_model_is_refused(tiny, finished, tmp_path):
    from recipes import digits_tasks_init
    inpaint = tmp_path / "inpaint"
    assert digits_tasks_init.main(["--base", str(tiny[0]), "--task", "inpaint", "--out", str(inpaint)]) == 0
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    refused(run_train(train_args(tiny, out, "--steps", "3", "--resume", model=inpaint), check=False),
            "state.json", "another run", "task 'text-to-image' there, 'inpaint' here")
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------------
# 9. Messages


def test_the_flash_sampler_names_its_real_step_limit():
    assert len(flash_timesteps(1000)) == 1000
    with pytest.raises(ValueError, match=r"in \[1, 1000\] \(the model's training timesteps\), got 10000"):
        flash_timesteps(10000)
