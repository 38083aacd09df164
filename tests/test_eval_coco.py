"""eval.py --coco end to end on a tiny COCO-format set built here (a captions JSON in COCO's layout and a
folder of small odd-sized images), a tiny random digits pipeline and a tiny random transformers CLIPModel:
the subset, the PNGs, the JSON and markdown outputs, the CLIP score against transformers, 1 rank against 2
ranks (torchrun, gloo on CPU: same pixels, same metrics), resuming after a SIGKILL and after lost or
truncated files, the feature cache, and FID of the sharded run against FID computed in this process.

The runs go through subprocesses with one thread each (as tests/train_helpers.py's run_train does), so
the 1- and 2-rank runs compute with the same kernels. Needs the FID Inception weights
(`python -m flash.metrics fetch`).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flash import evaluate_coco
from flash.metrics import INCEPTION_FILE
from helpers import ROOT, VOCAB
from recipes.digits_init import build as build_digits
from weights.save import save_pipeline

N = 6
SIZES = [(40, 30), (30, 40), (36, 36), (48, 20), (25, 33), (32, 32), (44, 28), (30, 30)]
needs_inception = pytest.mark.skipif(not INCEPTION_FILE.is_file(), reason="run `python -m flash.metrics fetch`")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pipeline folder, a CLIPModel folder (with the shipped CLIP vocabulary), and a COCO-format set."""
    from transformers import CLIPConfig, CLIPModel
    root = tmp_path_factory.mktemp("coco")
    save_pipeline(build_digits(seed=1, preset="small"), root / "pipe")
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(root / "clip")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(VOCAB / name, root / "clip" / name)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    images, annotations = [], []
    words = ["red", "blue", "round", "square", "dark", "striped", "tiny", "bright"]
    for k, (w, h) in enumerate(SIZES):
        image_id = 100 + 7 * k
        name = f"{image_id:012d}.jpg" if k % 2 else f"{image_id:012d}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        # Two captions per image, the larger annotation id first: the smaller id must win.
        annotations += [{"image_id": image_id, "id": 1000 + k, "caption": f"a {words[k]} digit number {k}"},
                        {"image_id": image_id, "id": 2000 + k, "caption": f"not this one {k}"}]
    images.append({"id": 999, "file_name": "uncaptioned.jpg", "height": 10, "width": 10})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def eval_command(setup, out, nproc=1, extra=()):
    """(command, environment) of an eval.py --coco run on the tiny set, one thread per process."""
    cmd = [sys.executable, str(ROOT / "eval.py")]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["--coco", setup / "captions.json", "--coco-images", setup / "images", "--clip", setup / "clip",
            "--model", setup / "pipe", "--images", N, "--batch", 2, "--steps", 2, "--out", out, "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return [str(c) for c in cmd], env


def run_eval(setup, out, nproc=1, extra=()):
    cmd, env = eval_command(setup, out, nproc, extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def generated_count(proc):
    return sum(int(line.split("generated ")[1].split()[0]) for line in proc.stderr.splitlines()
               if line.startswith("coco: rank"))


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def one_rank(setup):
    out = setup / "out1"
    proc = run_eval(setup, out)
    return out, proc


def test_subset_is_fixed_and_one_caption_per_image(setup):
    captions = evaluate_coco.read_captions(setup / "captions.json")
    assert len(captions) == len(SIZES) and 999 not in captions
    assert all(not c.startswith("not this one") for _, c in captions.values())
    a, b = evaluate_coco.draw_subset(captions, N), evaluate_coco.draw_subset(captions, N)
    assert a == b and len({e.image_id for e in a}) == N
    assert [e.index for e in a] == list(range(N))
    with pytest.raises(ValueError, match="only 8"):
        evaluate_coco.draw_subset(captions, 9)


@needs_inception
def test_one_rank_outputs_and_clip_score(setup, one_rank):
    from transformers import CLIPModel
    out, proc = one_rank
    assert generated_count(proc) == N
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(N)]
    assert all(Image.open(p).size == (32, 32) for p in out.glob("*.png"))
    report = json.loads((out / "results.json").read_text())
    assert report["n"] == N and report["world"] == 1 and report["fid"] > 0 and -1 <= report["clip_score"] <= 1
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| model | sampler | steps | CFG | NFE / image | FID | CLIP score |"
    assert md[2] == report["markdown"] and md[2].startswith("| model | flash | 2 | - | 2 |")
    assert report["markdown"] in proc.stdout

    # CLIP score against transformers on the same PNGs and captions (flash's preprocessing: its parity with
    # CLIPImageProcessor is tests/test_clip_vision.py's).
    from flash.clip_vision import preprocess
    from flash.tokenizer import load_tokenizer
    entries = evaluate_coco.draw_subset(evaluate_coco.read_captions(setup / "captions.json"), N)
    model = CLIPModel.from_pretrained(setup / "clip").eval()
    images = [torch.from_numpy(np.array(Image.open(out / f"{e.index:06d}.png"))).permute(2, 0, 1) for e in entries]
    ids, _ = load_tokenizer(setup / "clip")([e.caption for e in entries])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=preprocess(images, 32))
        txt = model.get_text_features(input_ids=ids)
    img = getattr(img, "image_embeds", getattr(img, "pooler_output", img))
    txt = getattr(txt, "text_embeds", getattr(txt, "pooler_output", txt))
    ref = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1).mean().item()
    assert report["clip_score"] == pytest.approx(ref, abs=1e-5)


@needs_inception
def test_two_ranks_match_one_rank_and_in_process_fid(setup, one_rank, monkeypatch):
    out1, _ = one_rank
    out2 = setup / "out2"
    proc = run_eval(setup, out2, nproc=2)
    assert generated_count(proc) == N
    # Blocks of --batch 2: [0, 1] and [4, 5] on rank 0, [2, 3] on rank 1.
    assert "rank 0: generated 4" in proc.stderr and "rank 1: generated 2" in proc.stderr
    a, b = pixels(out1), pixels(out2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (out1, out2))
    assert r2["world"] == 2 and r2["fid"] == r1["fid"] and r2["clip_score"] == r1["clip_score"]

    # FID of the sharded run's folder, computed here in one process without the cache.
    from flash.metrics import load_inception, fid_from_features
    monkeypatch.setattr(evaluate_coco, "CACHE", ".features_here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        entries = evaluate_coco.draw_subset(evaluate_coco.read_captions(setup / "captions.json"), N)
        inception = load_inception()
        real = evaluate_coco.fid_features(inception, [setup / "images" / e.file_name for e in entries], "cpu",
                                          square=True, progress=False)
        fake = evaluate_coco.fid_features(inception, [out2 / f"{e.index:06d}.png" for e in entries], "cpu",
                                          progress=False)
    finally:
        torch.set_num_threads(threads)
    assert fid_from_features(fake, real) == pytest.approx(r2["fid"], rel=1e-6)


@needs_inception
def test_resume_regenerates_only_missing_images_and_reuses_the_cache(setup, one_rank):
    out1, _ = one_rank
    out = setup / "out3"
    shutil.copytree(out1, out)
    (out / "000001.png").unlink()
    (out / "000004.png").unlink()
    (out / "000002.png").write_bytes((out1 / "000002.png").read_bytes()[:60])     # a truncated write
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name != "000002.png"}
    proc = run_eval(setup, out)
    assert generated_count(proc) == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in kept} == kept
    a, b = pixels(out1), pixels(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    r1, r3 = (json.loads((o / "results.json").read_text()) for o in (out1, out))
    assert (r3["fid"], r3["clip_score"]) == (r1["fid"], r1["clip_score"])

    # Nothing changed since: nothing generated, every feature read back from the cache (no file rewritten).
    cache = {p.name: p.stat().st_mtime_ns for p in (out / evaluate_coco.CACHE).iterdir()}
    proc = run_eval(setup, out)
    assert generated_count(proc) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / evaluate_coco.CACHE).iterdir()} == cache
    assert json.loads((out / "results.json").read_text())["fid"] == r1["fid"]


@needs_inception
def test_killed_run_resumes_without_regenerating(setup, one_rank):
    """SIGKILL as soon as the first PNG exists (during generation, or at the latest during the metrics), then
    the same command again: only the images the killed run had not written are generated, the written ones
    are kept as they are, and images and metrics equal an uninterrupted run's."""
    out1, _ = one_rank
    out = setup / "killed"
    cmd, env = eval_command(setup, out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and not list(out.glob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "results.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 1 <= len(written) <= N
    rerun = run_eval(setup, out)
    assert generated_count(rerun) == N - len(written)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in written} == written
    a, b = pixels(out1), pixels(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (out1, out))
    assert (r2["fid"], r2["clip_score"]) == (r1["fid"], r1["clip_score"])


def to_open_clip(state, layers):
    """transformers CLIPModel keys -> an open_clip file's layout, written out name by name (not the loader's
    rules run backwards): fused q/k/v, projections as (C, P) matrices applied x @ proj."""
    out = {"logit_scale": state["logit_scale"]}
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        for i in range(layers):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{n}_proj.{kind}"]
                                                               for n in "qkv"])
                for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[dst + f"{b}.{kind}"] = state[src + f"{a}.{kind}"]
    v, t = "vision_model.", "text_model."
    out.update({"visual.conv1.weight": state[v + "embeddings.patch_embedding.weight"],
                "visual.class_embedding": state[v + "embeddings.class_embedding"],
                "visual.positional_embedding": state[v + "embeddings.position_embedding.weight"],
                "visual.proj": state["visual_projection.weight"].t(),
                "token_embedding.weight": state[t + "embeddings.token_embedding.weight"],
                "positional_embedding": state[t + "embeddings.position_embedding.weight"],
                "text_projection": state["text_projection.weight"].t()})
    for kind in ("weight", "bias"):
        out.update({f"visual.ln_pre.{kind}": state[v + f"pre_layrnorm.{kind}"],
                    f"visual.ln_post.{kind}": state[v + f"post_layernorm.{kind}"],
                    f"ln_final.{kind}": state[t + f"final_layer_norm.{kind}"]})
    return {k: x.contiguous() for k, x in out.items()}


def test_open_clip_file_gives_the_folders_features(setup, tmp_path):
    """--clip also takes an open_clip file: both towers from it equal the CLIPModel folder's (GELU, as LAION's)."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel
    import weights
    cfg = CLIPConfig.from_pretrained(setup / "clip")
    cfg.text_config.hidden_act = cfg.vision_config.hidden_act = "gelu"
    ref = CLIPModel.from_pretrained(setup / "clip", config=cfg).eval()
    ref.save_pretrained(tmp_path / "gelu")
    save_file(to_open_clip(ref.state_dict(), 2), tmp_path / "open_clip_model.safetensors")
    # open_clip's text heads are width / 64 (here 1 head of 16): the tiny config's 2 heads are passed.
    text = weights.load_clip_text(tmp_path / "open_clip_model.safetensors", num_attention_heads=2)
    image = weights.load_image_encoder(tmp_path / "open_clip_model.safetensors", num_attention_heads=2)
    ids, _ = weights.load_tokenizer(setup / "clip")(["a red digit", "a blue thing number 3"])
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(text(ids).pooled, weights.load_clip_text(tmp_path / "gelu")(ids).pooled, atol=1e-6)
        assert torch.allclose(image(pixel_values), weights.load_image_encoder(tmp_path / "gelu")(pixel_values),
                              atol=1e-6)
        txt = ref.get_text_features(input_ids=ids)
    txt = getattr(txt, "text_embeds", getattr(txt, "pooler_output", txt))
    assert torch.allclose(text(ids).pooled, txt, atol=1e-5)


def test_errors_are_one_line(setup, tmp_path, capsys):
    import importlib
    eval_cli = importlib.import_module("eval")
    rc = eval_cli.main(["--coco", str(setup / "captions.json"), "--coco-images", str(setup / "images"),
                        "--clip", str(setup / "clip"), "--out", str(tmp_path)])
    assert rc == 2 and "--coco needs --n" in capsys.readouterr().err
    rc = eval_cli.main(["--coco", str(setup / "captions.json"), "--coco-images", str(tmp_path / "nope"),
                        "--clip", str(setup / "clip"), "--out", str(tmp_path), "--n", "4"])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err
