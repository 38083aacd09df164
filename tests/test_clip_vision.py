"""The CLIP image tower, its preprocessing and the CLIP score against transformers (the oracle): tiny random
towers saved with `save_pretrained` (CLIPVisionModelWithProjection and full CLIPModel folders) and read back by
weights.load_image_encoder; an open_clip-layout file made here by an independent inverse of the loader's rules;
CLIPImageProcessor on the real digits and on PIL-made photos of several sizes; full-size towers on the meta
device."""
import dataclasses
import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file

import weights
from flash import clip
from flash.clip_vision import CONFIGS, CLIPVisionModel, clip_score, from_config_json, preprocess, resize_crop
from flash.data import DIGITS_FILE, Digits, load_digits
from flash.io import CheckpointError, load_into, read_weights
from weights.clip_vision import from_open_clip, open_clip_config
from helpers import maxdiff, randomize

TOL = 1e-5


def tiny_vision_config(act="quick_gelu", hidden=32, heads=4, **kw):
    return transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=heads, image_size=28, patch_size=7, projection_dim=16,
                                         hidden_act=act, **kw)


def tiny_tower(act="quick_gelu", seed=0, **kw):
    return randomize(transformers.CLIPVisionModelWithProjection(tiny_vision_config(act, **kw)), seed)


def pixels(n=3, size=28, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference(ref, x):
    with torch.no_grad():
        return ref(pixel_values=x).image_embeds


def run(ours, x):
    with torch.no_grad():
        return ours(x)


# ---- the tower against transformers ----

@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_image_tower_parity(tmp_path, act):
    ref = tiny_tower(act)
    ref.save_pretrained(tmp_path)
    ours = weights.load_image_encoder(tmp_path)
    assert isinstance(ours, CLIPVisionModel) and ours.config.hidden_act == act
    x = pixels()
    assert maxdiff(run(ours, x), reference(ref, x)) < TOL


def test_image_tower_sharded_and_fp16(tmp_path):
    ref = tiny_tower("gelu")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    x = pixels()
    assert maxdiff(run(weights.load_image_encoder(tmp_path / "sharded"), x), reference(ref, x)) < TOL
    # A transformers-4 save also persisted the position_ids buffer: it is dropped.
    state = read_weights(tmp_path / "sharded" / "model.safetensors.index.json")
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    (tmp_path / "old").mkdir()
    save_file(state, tmp_path / "old" / "model.safetensors")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    assert maxdiff(run(weights.load_image_encoder(tmp_path / "old"), x), reference(ref, x)) < TOL


def tiny_clip_model(seed=3):
    text = dict(vocab_size=100, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=99, bos_token_id=98,
                pad_token_id=99)
    config = transformers.CLIPConfig(text_config=text, vision_config=tiny_vision_config().to_dict(),
                                     projection_dim=20)
    return randomize(transformers.CLIPModel(config), seed)


def test_clip_model_folder_and_clip_score(tmp_path):
    """A full CLIPModel folder: the image tower is read from it, and the CLIP score of our two towers over
    caption / image pairs equals the mean of transformers' (normalised) image_embeds . text_embeds."""
    ref = tiny_clip_model()
    ref.save_pretrained(tmp_path)
    ours = weights.load_image_encoder(tmp_path)
    assert ours.config.projection_dim == 20  # CLIPModel's top-level projection_dim, not vision_config's 16

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 98, (4, 12), generator=g)
    ids[:, 0] = 98
    ids[torch.arange(4), torch.tensor([11, 5, 7, 9])] = 99
    x = pixels(4, seed=5)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=x)
        image_ref = ref.visual_projection(ref.vision_model(pixel_values=x).pooler_output)
    assert maxdiff(run(ours, x), image_ref) < TOL

    # Our text tower, from the same folder's text keys (load_text_encoder reads text-only folders).
    config = ref.config.to_dict()
    text_cfg = dataclasses.replace(clip.from_config_json(config["text_config"]), with_projection=True,
                                   projection_dim=config["projection_dim"])
    with torch.device("meta"):
        text = clip.CLIPTextModel(text_cfg)
    state = read_weights(tmp_path / "model.safetensors")
    load_into(text, {k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))})
    with torch.no_grad():
        text_embeds = text(ids).pooled

    expected = (out.image_embeds * out.text_embeds).sum(-1).mean().item()
    score = clip_score(run(ours, x), text_embeds)
    assert abs(score - expected) < TOL
    assert abs(score) < 1  # unscaled: a cosine, not torchmetrics' x100


# ---- open_clip layout ----

def to_open_clip(state, layers):
    """transformers' CLIPVisionModelWithProjection keys -> open_clip's `visual.*` layout, written out name by
    name (the inverse of the loader's rules, not derived from them)."""
    v = "vision_model."
    out = {"visual.conv1.weight": state[v + "embeddings.patch_embedding.weight"],
           "visual.class_embedding": state[v + "embeddings.class_embedding"],
           "visual.positional_embedding": state[v + "embeddings.position_embedding.weight"],
           "visual.proj": state["visual_projection.weight"].t().contiguous()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"visual.{theirs}.{p}"] = state[f"{v}{ours}.{p}"]
    for i in range(layers):
        a, b = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"attn.in_proj_{p}"] = torch.cat([state[a + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[b + f"attn.out_proj.{p}"] = state[a + f"self_attn.out_proj.{p}"]
            out[b + f"ln_1.{p}"] = state[a + f"layer_norm1.{p}"]
            out[b + f"ln_2.{p}"] = state[a + f"layer_norm2.{p}"]
            out[b + f"mlp.c_fc.{p}"] = state[a + f"mlp.fc1.{p}"]
            out[b + f"mlp.c_proj.{p}"] = state[a + f"mlp.fc2.{p}"]
    # The text tower of an open_clip file is not read.
    out["token_embedding.weight"] = torch.zeros(10, 4)
    out["transformer.resblocks.0.ln_1.weight"] = torch.ones(4)
    out["logit_scale"] = torch.tensor(4.6)
    return out


@pytest.mark.parametrize("act, hidden, heads", [("gelu", 128, None), ("quick_gelu", 32, 4)])
def test_open_clip_layout(tmp_path, act, hidden, heads):
    """gelu / width 128: LAION's defaults (GELU, heads of width 64) inferred; quick_gelu / width 32: given."""
    ref = tiny_tower(act, hidden=hidden, heads=heads or hidden // 64)
    ref.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(to_open_clip(state, 3), tmp_path / "open_clip_model.safetensors")
    kw = {} if heads is None else dict(num_attention_heads=heads, hidden_act=act)
    ours = weights.load_image_encoder(tmp_path / "open_clip_model.safetensors", **kw)
    assert dataclasses.asdict(ours.config) == dataclasses.asdict(weights.load_image_encoder(tmp_path / "hf").config)
    loaded = ours.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    x = pixels()
    assert torch.equal(run(ours, x), run(weights.load_image_encoder(tmp_path / "hf"), x))
    assert maxdiff(run(ours, x), reference(ref, x)) < TOL


def test_refusals(tmp_path):
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        weights.load_image_encoder(tmp_path / "open_clip_pytorch_model.bin")
    save_file({"token_embedding.weight": torch.zeros(2, 2)}, tmp_path / "text_only.safetensors")
    with pytest.raises(CheckpointError, match="visual"):
        weights.load_image_encoder(tmp_path / "text_only.safetensors")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8,
                                                           num_hidden_layers=1, num_attention_heads=2)
                               ).save_pretrained(tmp_path / "text")
    with pytest.raises(CheckpointError, match="architectures"):
        weights.load_image_encoder(tmp_path / "text")
    tiny_tower().save_pretrained(tmp_path / "relu")
    cfg = (tmp_path / "relu" / "config.json").read_text().replace('"quick_gelu"', '"relu"')
    (tmp_path / "relu" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        weights.load_image_encoder(tmp_path / "relu")


def test_from_config_json():
    d = dict(tiny_vision_config().to_dict(), model_type="clip_vision_model", attention_dropout=0.0)
    assert from_config_json(d) == dataclasses.replace(
        CONFIGS["vit-l-14"], hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=16)
    for bad, name in ((dict(num_channels=1), "num_channels"), (dict(patch_size=5), "patch_size"),
                      (dict(num_attention_heads=5), "num_attention_heads")):
        with pytest.raises(ValueError, match=name):
            from_config_json(dict(d, **bad))


# ---- full-size towers on the meta device ----

@pytest.mark.parametrize("name, count", [("vit-l-14", 303_966_208), ("vit-g-14", 1_012_645_632)])
def test_full_size_on_meta(name, count):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ours = CLIPVisionModel(cfg)
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dataclasses.asdict(cfg)))
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count


@pytest.mark.parametrize("name, act", [("vit-l-14", "quick_gelu"), ("vit-g-14", None)])
def test_open_clip_full_size_config(name, act):
    """The full-size open_clip layouts (as meta tensors) give back the presets: ViT-g/14's heads of width 88
    come from the width table, ViT-L/14's 16 from the default head width 64; OpenAI's quick-GELU is passed."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dataclasses.asdict(cfg)))
    state = from_open_clip(to_open_clip(ref.state_dict(), cfg.num_hidden_layers))
    assert set(state) == set(ref.state_dict())
    assert open_clip_config(state, **({} if act is None else dict(hidden_act=act))) == cfg


# ---- preprocessing against CLIPImageProcessor ----

def processor(images, normalize):
    proc = transformers.CLIPImageProcessor()
    return torch.from_numpy(np.stack(proc(images=images, do_normalize=normalize)["pixel_values"])).float()


def check_preprocess(pil_images, tensors):
    """Before normalisation within 1/255 (in fact equal: the resize is PIL's integer arithmetic), after it to
    float rounding."""
    raw = torch.stack([resize_crop(t) for t in tensors]).float() / 255
    assert maxdiff(raw, processor(pil_images, normalize=False)) <= 1 / 255
    assert maxdiff(raw, processor(pil_images, normalize=False)) < 1e-6
    assert maxdiff(preprocess(tensors), processor(pil_images, normalize=True)) < TOL


@pytest.mark.skipif(not DIGITS_FILE.is_file(), reason="digits data absent: run `python -m flash.data fetch`")
def test_preprocess_digits():
    digits, _ = load_digits()
    digits = digits[::500]  # 28x28 grey, upscaled 8x
    check_preprocess([Image.fromarray(d) for d in digits], [torch.from_numpy(d) for d in digits])
    # The training digits (3x32x32 in [-1, 1]) as a batch tensor: quantised as a PNG write would.
    batch = Digits("test").images[:6]
    png = ((batch + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    check_preprocess([Image.fromarray(p.permute(1, 2, 0).numpy()) for p in png], batch)


def photo(width, height, seed):
    """A photo-like RGB image: gradients, shapes with hard edges, fine noise, blurred and JPEG-compressed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy), xx * yy], axis=-1) * 0.5 + 0.5
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(2, width // 2 + 3), y0 + rng.integers(2, height // 2 + 3)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noise = rng.integers(-40, 41, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(0.7))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_preprocess_photos():
    # landscape, portrait, very wide, small (upscaled), exactly 224, odd sizes around 224, large square
    sizes = [(640, 480), (427, 640), (1000, 300), (37, 100), (224, 224), (225, 223), (901, 899)]
    images = [photo(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    check_preprocess(images, [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])
