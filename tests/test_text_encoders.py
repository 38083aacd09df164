"""Parity of flash.clip / flash.t5 with transformers (the oracle) on tiny random configs saved with
`save_pretrained` and read back by weights.load_text_encoder; full-size structure checked on the meta device."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import weights
from flash import clip, t5
from helpers import maxdiff

TOL = 1e-5
EOS = 99  # tiny vocabulary of 100: the largest id plays <|endoftext|>, as 49407 does in the real one


def tiny_clip_config(act="quick_gelu", eos_token_id=EOS, **kw):
    return transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
                                       projection_dim=24, bos_token_id=98, eos_token_id=eos_token_id, pad_token_id=0,
                                       **kw)


def tiny_t5_config():
    return transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, decoder_start_token_id=0)


def clip_batch(eos=EOS):
    """Row 0: full length, eos last. Row 1: eos in the middle, then eos-padding (SD1.5 style).
    Row 2: eos in the middle, then "!"-padding with id 0 (SDXL tokenizer_2 style)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 98, (3, 12), generator=g)
    ids[:, 0] = 98
    ids[ids == eos] = 1  # eos only where placed below
    ids[0, -1] = eos
    ids[1, 5:] = eos
    ids[2, 7] = eos
    ids[2, 8:] = 0
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 8:] = 0
    return ids, mask


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def check_clip(ours, ref, ids, mask):
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        r = ref(ids, attention_mask=mask, output_hidden_states=True)
    pooled = r.text_embeds if hasattr(r, "text_embeds") else r.pooler_output
    diffs = {"last": maxdiff(out.last_hidden_state, r.last_hidden_state),
             "penultimate": maxdiff(out.penultimate_hidden_state, r.hidden_states[-2]),
             "pooled": maxdiff(out.pooled, pooled)}
    assert out.pooled.shape == pooled.shape
    assert max(diffs.values()) <= TOL, diffs
    return diffs


@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_parity(tmp_path, with_projection):
    # CLIPTextModel with OpenAI's quick_gelu; CLIPTextModelWithProjection with OpenCLIP's exact gelu.
    if with_projection:
        ref = transformers.CLIPTextModelWithProjection(tiny_clip_config("gelu")).eval()
    else:
        ref = transformers.CLIPTextModel(tiny_clip_config("quick_gelu")).eval()
    ours = weights.load_text_encoder(save(ref, tmp_path))
    assert isinstance(ours, clip.CLIPTextModel) and (ours.text_projection is not None) == with_projection
    assert ours.config.hidden_act == ("gelu" if with_projection else "quick_gelu")
    ids, mask = clip_batch()
    check_clip(ours, ref, ids, None)
    check_clip(ours, ref, ids, mask)
    # The pooled state really is the one at the first eos: row 1's eos sits at position 5.
    with torch.no_grad():
        out = ours(ids)
    if not with_projection:
        assert torch.equal(out.pooled[1], out.last_hidden_state[1, 5])


def test_clip_legacy_eos_rule(tmp_path):
    # eos_token_id == 2 (released SD configs): transformers pools at the argmax of the ids instead.
    ref = transformers.CLIPTextModel(tiny_clip_config(eos_token_id=2)).eval()
    ours = weights.load_text_encoder(save(ref, tmp_path))
    ids, mask = clip_batch()
    ids[2, 3] = 2  # a literal 2 in the text must not be taken for the end token
    check_clip(ours, ref, ids, mask)
    assert clip.eos_positions(ids, 2).tolist() == [11, 5, 7]
    assert clip.eos_positions(ids, EOS).tolist() == [11, 5, 7]


def test_clip_eos_not_largest_id(tmp_path):
    # A newer config whose eos is not the largest id (added tokens): first position equal to eos, not argmax.
    ref = transformers.CLIPTextModel(tiny_clip_config(eos_token_id=50)).eval()
    ours = weights.load_text_encoder(save(ref, tmp_path))
    ids, mask = clip_batch(eos=50)
    assert (ids.argmax(-1) != torch.tensor([11, 5, 7])).any()  # the argmax rule would pool elsewhere
    assert clip.eos_positions(ids, 50).tolist() == [11, 5, 7]
    check_clip(ours, ref, ids, mask)


def test_clip_transformers4_layout(tmp_path):
    """A transformers-4 save: `text_model.` prefix and the persisted position_ids buffer (< 4.31)."""
    ref = transformers.CLIPTextModel(tiny_clip_config()).eval()
    save(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 dropped the wrapper
    old = {"text_model." + k: v for k, v in state.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(old, tmp_path / "model.safetensors")
    ours = weights.load_text_encoder(tmp_path)
    check_clip(ours, ref, *clip_batch())


def test_clip_sharded_and_fp16(tmp_path):
    ref = transformers.CLIPTextModelWithProjection(tiny_clip_config("gelu")).eval()
    save(ref, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = weights.load_text_encoder(tmp_path / "sharded")
    check_clip(ours, ref, *clip_batch())

    # fp16 copy: read and upcast to fp32; compare with the oracle whose weights went through fp16 too.
    save(ref.half(), tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "model.fp16.safetensors").is_file()
    ours = weights.load_text_encoder(tmp_path / "fp16")
    assert ours.text_projection.weight.dtype == torch.float32
    check_clip(ours, ref.float(), *clip_batch())
    assert weights.load_text_encoder(tmp_path / "fp16", dtype=None).text_projection.weight.dtype == torch.float16


def t5_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 100, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:] = 0  # pad id 0 after the text, as PixArt's tokenizer does
    mask[1, 6:] = 0
    return ids, mask


def check_t5(ours, ref, ids, mask):
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        r = ref(ids, attention_mask=mask).last_hidden_state
    d = maxdiff(out, r)
    assert d <= TOL, d
    return d


def test_t5_parity(tmp_path):
    ref = transformers.T5EncoderModel(tiny_t5_config()).eval()
    save(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "shared.weight" in state and "encoder.embed_tokens.weight" not in state  # the tie rule is needed
    ours = weights.load_text_encoder(tmp_path)
    assert isinstance(ours, t5.T5EncoderModel)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    ids, mask = t5_batch()
    check_t5(ours, ref, ids, None)
    check_t5(ours, ref, ids, mask)
    # Masking matters: without it the padded row's real tokens see the pads.
    with torch.no_grad():
        assert maxdiff(ours(ids)[1, :6], ours(ids, mask)[1, :6]) > 1e-3


def test_t5_other_tie_name_sharded_and_fp16(tmp_path):
    ref = transformers.T5EncoderModel(tiny_t5_config()).eval()
    # A file holding only encoder.embed_tokens.weight (the other name of the tie).
    save(ref, tmp_path / "a")
    state = load_file(tmp_path / "a" / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, tmp_path / "a" / "model.safetensors")
    check_t5(weights.load_text_encoder(tmp_path / "a"), ref, *t5_batch())

    save(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    check_t5(weights.load_text_encoder(tmp_path / "sharded"), ref, *t5_batch())

    save(ref.half(), tmp_path / "fp16", variant="fp16")
    check_t5(weights.load_text_encoder(tmp_path / "fp16"), ref.float(), *t5_batch())


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-300, 301)[None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(t5.relative_position_bucket(rel, 32, 128), ref)


# ---- full-size structure, on the meta device (never run) ----

def meta_stats(model):
    return sum(p.numel() for p in model.parameters()), set(model.state_dict())


def test_full_size_clip_l():
    with torch.device("meta"):
        ours = clip.CLIPTextModel(clip.CONFIGS["clip-l"])
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768))
    n, keys = meta_stats(ours)
    n_ref, keys_ref = meta_stats(ref)
    assert n == n_ref == 123_060_480
    # transformers 5's CLIPTextModel has no `text_model.` wrapper; its checkpoints on disk (v4) do.
    assert keys == {"text_model." + k for k in keys_ref}


def test_full_size_openclip_bigg():
    with torch.device("meta"):
        ours = clip.CLIPTextModel(clip.CONFIGS["openclip-bigg"])
        ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu"))
    n, keys = meta_stats(ours)
    assert (n, keys) == meta_stats(ref)
    assert n == 694_659_840


def test_full_size_t5_xxl():
    with torch.device("meta"):
        ours = t5.T5EncoderModel(t5.CONFIGS["t5-v1_1-xxl"])
        ref = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu"))
    n, keys = meta_stats(ours)
    assert (n, keys) == meta_stats(ref)
    assert 4.7e9 < n < 4.8e9


def test_from_config_json():
    d = {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 64, "num_attention_heads": 4,
         "hidden_act": "gelu", "attention_dropout": 0.0, "model_type": "clip_text_model", "torch_dtype": "float16"}
    cfg = clip.from_config_json(d)
    assert cfg.with_projection and cfg.hidden_size == 64 and cfg.vocab_size == 49408
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        clip.from_config_json({**d, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        t5.from_config_json({"d_model": 8})  # transformers' default is T5 v1.0's relu
    assert t5.from_config_json({"feed_forward_proj": "gated-gelu", "is_decoder": False}).d_model == 512


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_bias_matches_reference(is_causal, padded):
    # kernels.attention's `attn_bias` (added for T5's position bias) against the plain-PyTorch spec.
    import kernels
    from kernels.attention import attention_ref
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    bias = torch.randn(1, 3, 7, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    mask = mask if padded else None
    out = kernels.attention(q, k, v, key_padding_mask=mask, is_causal=is_causal, scale=1.0, attn_bias=bias)
    ref = attention_ref(q, k, v, key_padding_mask=mask, is_causal=is_causal, scale=1.0, attn_bias=bias)
    assert maxdiff(out, ref) <= TOL
    assert maxdiff(out, kernels.attention(q, k, v, key_padding_mask=mask, is_causal=is_causal, scale=1.0)) > 1e-2
