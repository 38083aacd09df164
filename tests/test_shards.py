"""Tar shards (flash/shards.py), aspect-ratio buckets (flash/buckets.py) and the prefetched sample stream
(flash.data.Stream), alone and through train.py on tiny pipelines.

- Shards of the digits and of images of several sizes and aspect ratios train bit for bit as the same samples
  laid out as an image folder, with 0 or 2 DataLoader workers.
- A 2-rank torchrun run reads every sample of an epoch exactly once across its ranks; killed and resumed it
  ends bitwise equal to the uninterrupted run.
- With --buckets every batch has one shape, its bucket's, and SDXL's time ids and PixArt's resolution and
  aspect ratio are what diffusers' code computes for each image (the arithmetic of train_text_to_image_sdxl.py
  restated below; PixArt's bins and classify_height_width_bin imported from diffusers).
- Corrupt members are skipped, counted in log.jsonl and warned about once; the run trains to the end.
- The member index is cached beside the shards (or in the run folder) and rebuilt when a shard changes.
"""
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flash.shards
import train
from flash.buckets import PIXART_1024, PIXART_512, SDXL, bucket_set, nearest_bucket, size_info
from flash.data import DIGITS_FILE, Stream, load_digits, load_samples, stream_length, training_set
from flash.shards import expand_braces, index_shard, index_shards, shard_paths
from helpers import ROOT
from train_helpers import make_tiny_pixart, make_tiny_sd, make_tiny_sdxl, read_log, read_tensors, run_train

BASE = ["--K", "4", "--lr", "1e-3", "--lora-rank", "4", "--seed", "3", "--phase-len", "1"]
RECORD = ROOT / "tests" / "train_record.py"
WORDS = ["red", "blue", "green", "dark", "bright", "round", "square", "striped"]
MIXED = [(16, 16), (12, 20), (20, 12), (24, 16), (16, 40), (9, 16), (33, 17), (16, 24)]   # (height, width)


def make_folder(folder, sizes, seed=0):
    """Random RGB images of these (height, width) with unique .txt captions, named in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (h, w) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"img{k:03d}.png")
        (folder / f"img{k:03d}.txt").write_text(f"a {WORDS[k % 8]} thing number {k}")
    return folder


def digits_folder(folder, n=8):
    """The first n real digits as 28 x 28 PNGs with a caption each."""
    images, labels = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(images[k]).convert("RGB").save(folder / f"img{k:03d}.png")
        (folder / f"img{k:03d}.txt").write_text(f"a handwritten digit {int(labels[k])} (sample {k})")
    return folder


def make_shards(folder, out, per_shard):
    """The folder's images and captions as webdataset-style shards out/000000.tar, ... (key = file stem)."""
    files = sorted(folder.glob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(out / f"{s // per_shard:06d}.tar", "w") as tar:
            for f in files[s:s + per_shard]:
                tar.add(f, arcname=f.name)
                tar.add(f.with_suffix(".txt"), arcname=f.with_suffix(".txt").name)
    return out


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def same_run(a, b):
    """Bitwise equal weights and equal logs."""
    for name in ("trainable", "discriminator"):
        x, y = read_tensors(a / "checkpoint-last" / f"{name}.safetensors"), read_tensors(b / "checkpoint-last" /
                                                                                         f"{name}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert read_log(a) == read_log(b)


def seen(out):
    return [json.loads(line) for p in sorted(Path(out).parent.glob(f"{Path(out).name}.seen-*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("shards") / "pipe")


# ---------------------------------------------------------------------------------------------------
# Shard specs and the index


def test_brace_expansion_and_specs(tmp_path):
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    with pytest.raises(ValueError, match="FIRST <= LAST"):
        expand_braces("{3..1}.tar")
    shards = make_shards(make_folder(tmp_path / "f", MIXED[:4]), tmp_path / "s", 2)
    assert shard_paths(str(shards)) == shard_paths(str(shards / "{000000..000001}.tar")) == sorted(shards.glob("*.tar"))
    with pytest.raises(ValueError, match="no such shard"):
        shard_paths(str(shards / "{000000..000002}.tar"))


def test_index_is_cached_beside_the_shard_or_in_the_run_folder(tmp_path, monkeypatch):
    shards = make_shards(make_folder(tmp_path / "f", MIXED[:4]), tmp_path / "s", 4)
    shard = shards / "000000.tar"
    index = index_shard(shard)
    assert [s[0] for s in index["samples"]] == ["img000", "img001", "img002", "img003"] and not index["skipped"]
    assert [s[3:5] for s in index["samples"]] == [list(hw) for hw in MIXED[:4]]     # original (h, w)
    assert (shards / "000000.tar.index.json").is_file()
    monkeypatch.setattr(flash.shards, "scan", lambda *a: pytest.fail("the cached index was not used"))
    assert index_shard(shard) == index
    monkeypatch.undo()
    with tarfile.open(shard, "a") as tar:       # the shard changes: the index is rebuilt
        add_member(tar, "img999.txt", b"a caption without an image")
    assert index_shard(shard)["skipped"] == [["img999", "no image member"]]
    # A folder where the index cannot be written (here a directory in its place): the run folder holds it.
    other = make_shards(make_folder(tmp_path / "g", MIXED[:2]), tmp_path / "t", 2)
    (other / "000000.tar.index.json").mkdir()
    index_shard(other / "000000.tar", fallback_dir=tmp_path / "run")
    assert len(list((tmp_path / "run" / "shard-index").glob("000000-*.json"))) == 1
    # Indexing shards in parallel processes gives what one process gives.
    paths = shard_paths(str(make_shards(make_folder(tmp_path / "h", MIXED), tmp_path / "u", 3)))
    parallel = index_shards(paths, processes=2, share=(1, 2))
    for path in paths:
        path.with_name(path.name + ".index.json").unlink()
    assert parallel == [index_shard(path) for path in paths] and sum(len(i["samples"]) for i in parallel) == 8


# ---------------------------------------------------------------------------------------------------
# Shards train exactly as the same samples in a folder; any number of workers


@pytest.mark.parametrize("source", ["digits", "mixed"])
def test_shards_train_like_the_same_folder(sd, tmp_path, source):
    if source == "digits" and not DIGITS_FILE.is_file():
        pytest.skip("digits data absent: run `python -m flash.data fetch`")
    folder = digits_folder(tmp_path / "folder") if source == "digits" else make_folder(tmp_path / "folder", MIXED)
    shards = make_shards(folder, tmp_path / "shards", 3)          # 3 shards of 3, 3 and 2 samples
    common = ["--model", sd, *BASE, "--steps", "3", "--batch-size", "2", "--resolution", "16"]
    run_train(common + ["--data", folder, "--out", tmp_path / "from-folder"])
    run_train(common + ["--data", shards / "{000000..000002}.tar", "--out", tmp_path / "from-shards", "--workers", "2"])
    same_run(tmp_path / "from-folder", tmp_path / "from-shards")


def test_stream_is_the_same_with_0_1_2_workers(tmp_path):
    shards = make_shards(make_folder(tmp_path / "f", MIXED * 2), tmp_path / "s", 5)
    buckets = bucket_set("sdxl", 32, 8)
    for kind in ({}, {"buckets": buckets, "batch_size": 2}):
        dataset = training_set(str(shards), 32, **kind)
        starts = list(range(0, 3 * stream_length(dataset), 2))        # three epochs of batches of 2
        results = []
        for workers in (0, 1, 2):
            stream = Stream(dataset, 5, 32, starts, 2, workers)
            results.append([stream.batch(range(s, s + 2)) for s in starts])
        for other in results[1:]:
            for (x, c, s), (y, d, t) in zip(results[0], other):
                assert torch.equal(x, y) and c == d and s == t


# ---------------------------------------------------------------------------------------------------
# Two ranks: every sample of an epoch once; killed and resumed, bitwise equal


@pytest.mark.slow
def test_two_ranks_cover_an_epoch_once_and_resume_exactly(sd, tmp_path):
    folder = make_folder(tmp_path / "folder", MIXED)
    shards = make_shards(folder, tmp_path / "shards", 3)
    args = lambda out: ["--model", sd, "--data", shards, "--out", out, *BASE, "--steps", "4",  # noqa: E731
                        "--batch-size", "2", "--resolution", "16", "--checkpoint-every", "1", "--workers", "1"]
    ref = tmp_path / "ref"
    run_train(args(ref), nproc=2, script=RECORD)
    batches = seen(ref)
    assert len(batches) == 8                        # 4 steps x 2 ranks, one micro-batch of 2 each
    captions = sorted((tmp_path / "folder").glob("*.txt"))
    for epoch in (0, 1):                            # 8 samples: 2 steps x 2 ranks x 2 per epoch
        got = [c for b in batches if b["positions"][0] // 8 == epoch for c in b["captions"]]
        assert sorted(got) == sorted(p.read_text() for p in captions), epoch      # each exactly once
    assert {tuple(b["positions"]) for b in batches} == {(p, p + 1) for p in range(0, 16, 2)}
    k = random.Random().randint(1, 2)
    proc = run_train(args(tmp_path / "killed"), nproc=2, fault=f"kill-step:{k}", check=False)
    assert proc.returncode != 0 and len(read_log(tmp_path / "killed")) == k, proc.stderr[-2000:]
    run_train(args(tmp_path / "killed") + ["--resume"], nproc=2)
    same_run(ref, tmp_path / "killed")


# ---------------------------------------------------------------------------------------------------
# Buckets and size conditioning, against diffusers


def diffusers_sdxl_time_ids(height, width, target):
    """train_text_to_image_sdxl.py's preprocessing, restated: transforms.Resize (the side that binds becomes the
    target, the other int(target * long / short)), then CenterCrop's offsets int(round((H' - h) / 2.0)); the
    script's square target generalised to a bucket (h, w) by resizing the image to cover it."""
    th, tw = target
    if th / height >= tw / width:
        rh, rw = th, int(th * width / height)
    else:
        rh, rw = int(tw * height / width), tw
    y1, x1 = max(0, int(round((rh - th) / 2.0))), max(0, int(round((rw - tw) / 2.0)))
    return [height, width, y1, x1, th, tw]


def test_bucket_sets_and_size_info_equal_diffusers():
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    assert {k: list(map(float, v)) for k, v in PIXART_1024.items()} == ASPECT_RATIO_1024_BIN
    assert {k: list(map(float, v)) for k, v in PIXART_512.items()} == ASPECT_RATIO_512_BIN
    # SDXL's: 40 distinct pairs, sides multiples of 64, 0.9 to 1 megapixel, from 1:4 to 4:1.
    assert len(set(SDXL)) == 40 and all(h % 64 == w % 64 == 0 and 0.9 < h * w / 1024**2 <= 1 for h, w in SDXL)
    assert (512, 2048) in SDXL and (1024, 1024) in SDXL and (2048, 512) in SDXL
    assert [b.size for b in bucket_set("pixart", 1024, 8)] == list(PIXART_1024.values())    # unscaled at 1024
    assert [b.size for b in bucket_set("sdxl", 1024, 64)] == SDXL
    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(64, 4000), rng.randint(64, 4000)
        for table, res in ((ASPECT_RATIO_1024_BIN, 1024), (ASPECT_RATIO_512_BIN, 512)):
            b = bucket_set("pixart", res, 8)[nearest_bucket(h, w, bucket_set("pixart", res, 8))]
            assert b.size == PixArtImageProcessor.classify_height_width_bin(h, w, table)
            info = size_info(h, w, b.size, b.ratio)     # PixArt: original size, the bin's ratio key
            assert info.original == (h, w) and str(info.aspect_ratio) in table
        sdxl = bucket_set("sdxl", 1024, 64)
        b = sdxl[nearest_bucket(h, w, sdxl)]
        assert b.size == min(SDXL, key=lambda s: abs(s[0] / s[1] - h / w))
        for target in (b.size, (1024, 1024), (512, 512)):
            info = size_info(h, w, target)
            assert [*info.original, *info.crop, *info.target] == diffusers_sdxl_time_ids(h, w, target)


def bucket_images(folder):
    """Two images for each of three buckets (about 1:1, 1:2, 2:1), of different sizes."""
    return make_folder(folder, [(40, 40), (56, 52), (30, 60), (36, 72), (70, 35), (64, 32)])


@pytest.mark.parametrize("family", ["sdxl", "pixart"])
def test_buckets_one_shape_per_batch_and_size_conditioning(tmp_path, family):
    pipe = make_tiny_sdxl(tmp_path / "pipe") if family == "sdxl" else make_tiny_pixart(tmp_path / "p" / "pipe")
    shards = make_shards(bucket_images(tmp_path / "folder"), tmp_path / "shards", 4)
    res = 64 if family == "sdxl" else 32
    out = tmp_path / "run"
    run_train(["--model", pipe, "--data", shards, "--out", out, *BASE, "--steps", "3", "--batch-size", "2",
               "--resolution", res, "--buckets", "--sample-every", "3", "--workers", "1"], script=RECORD)
    assert Image.open(out / "samples" / "step-0000003.png").size == (4 * res, 4 * res)    # square previews
    buckets = bucket_set(family, res, 8)
    originals = {f.read_text(): Image.open(f.with_suffix(".png")).size[::-1]
                 for f in (tmp_path / "folder").glob("*.txt")}
    batches = seen(out)
    assert len(batches) == 3 and len({tuple(b["shape"]) for b in batches}) == 3     # one epoch: 3 buckets of 2
    for b in batches:
        for k, caption in enumerate(b["captions"]):
            h, w = originals[caption]
            bucket = buckets[nearest_bucket(h, w, buckets)]
            assert b["shape"][2:] == list(bucket.size)          # the whole batch at its bucket's size
            if family == "sdxl":
                assert b["time_ids"][k] == diffusers_sdxl_time_ids(h, w, bucket.size)
            else:
                assert b["resolution"][k] == [h, w] and b["aspect_ratio"][k] == [pytest.approx(bucket.ratio)]


# ---------------------------------------------------------------------------------------------------
# Bad samples and bad input


def test_corrupt_members_are_skipped_and_counted(sd, tmp_path):
    folder = make_folder(tmp_path / "folder", MIXED[:6])
    shards = make_shards(folder, tmp_path / "shards", 6)
    png = (folder / "img000.png").read_bytes()
    with tarfile.open(shards / "000000.tar", "a") as tar:
        add_member(tar, "zz1.png", png[:len(png) // 2])                     # a truncated image
        add_member(tar, "zz2.jpg", b"not a jpeg at all")
        add_member(tar, "zz3.png", png)
        add_member(tar, "zz3.txt", b"\xff\xfe caption that is not UTF-8")
        add_member(tar, "zz4.png", png)
        add_member(tar, "zz4.json", b'{"caption": "unterminated')
    dataset = training_set(str(shards), 16)
    assert len(dataset) == 6 and sorted(s[1] for s in dataset.skipped) == ["zz1", "zz2", "zz3", "zz4"]
    out = tmp_path / "run"
    proc = run_train(["--model", sd, "--data", shards, "--out", out, *BASE, "--steps", "4", "--batch-size", "2",
                      "--resolution", "16"])
    log = read_log(out)
    assert len(log) == 4 and all(r["bad_samples"] == 4 for r in log)
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "skipped 4 bad samples" in warnings[0], proc.stderr[-2000:]


def test_json_captions_and_caption_key(tmp_path):
    png = (make_folder(tmp_path / "f", MIXED[:1]) / "img000.png").read_bytes()
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for k in range(2):
            add_member(tar, f"sub/{k}.png", png)
            add_member(tar, f"sub/{k}.json", json.dumps({"text": f"json caption {k}", "caption": "other"}).encode())
    captions = lambda **kw: load_samples(training_set(str(tmp_path / "a.tar"), 16, **kw), 0, range(2))[1]  # noqa: E731
    assert sorted(captions(caption_key="text")) == ["json caption 0", "json caption 1"]
    assert captions() == ["other", "other"]         # the default key; the index is rebuilt for it


@pytest.mark.parametrize("bad", [["--data", "TMP/none/{000..003}.tar"], ["--data", "TMP/x.tar.gz"],
                                 ["--data", "TMP/{3..1}.tar"], ["--buckets"], ["--workers", "-1"]])
def test_bad_data_flags_give_one_line(sd, tmp_path, capsys, bad):
    folder = make_folder(tmp_path / "f", MIXED[:2])
    (tmp_path / "x.tar.gz").write_bytes(b"")
    args = {"--model": str(sd), "--data": str(folder), "--out": str(tmp_path / "out"), "--steps": "1"}
    extra = [b.replace("TMP", str(tmp_path)) for b in bad]
    if extra[0] in args and len(extra) == 2:
        args[extra[0]], extra = extra[1], []
    with pytest.raises(SystemExit) as e:
        train.main([x for kv in args.items() for x in kv] + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("train.py: error:") and "\n" not in err, err
