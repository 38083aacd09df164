"""A checkpoint that cannot be loaded fails with one CheckpointError whose single-line message names the
problem (the key, the file), never with a traceback from deep inside torch or a silently half-loaded model."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import weights
from weights import CheckpointError


@pytest.fixture
def clip_folder(tmp_path):
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=8, bos_token_id=98,
                                      eos_token_id=99, pad_token_id=0)
    transformers.CLIPTextModel(cfg).save_pretrained(tmp_path)
    weights.load_text_encoder(tmp_path)  # the untouched folder loads
    return tmp_path


def edit_state(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)


def load_error(folder, **kw):
    with pytest.raises(CheckpointError) as e:
        weights.load_text_encoder(folder, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_key(clip_folder):
    edit_state(clip_folder, lambda s: s.pop("encoder.layers.1.mlp.fc2.bias"))
    msg = load_error(clip_folder)
    assert "1 missing keys" in msg and "text_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "model.safetensors" in msg


def test_extra_key(clip_folder):
    edit_state(clip_folder, lambda s: s.update({"text_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(32, 16)}))
    msg = load_error(clip_folder)
    assert "1 unexpected keys" in msg and "text_model.encoder.layers.2.mlp.fc1.weight" in msg
    assert "missing" not in msg


def test_wrong_shape(clip_folder):
    edit_state(clip_folder, lambda s: s.update({"embeddings.token_embedding.weight": torch.zeros(101, 16)}))
    msg = load_error(clip_folder)
    assert "wrong-shape" in msg and "text_model.embeddings.token_embedding.weight (101, 16)" in msg
    assert "(100, 16)" in msg


def test_truncated_file(clip_folder):
    path = clip_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(clip_folder)
    assert str(path) in msg and "truncated" in msg


def test_pickle_refused(clip_folder):
    state = load_file(clip_folder / "model.safetensors")
    (clip_folder / "model.safetensors").unlink()
    torch.save(state, clip_folder / "pytorch_model.bin")
    msg = load_error(clip_folder)
    assert "pytorch_model.bin" in msg and "pickle" in msg


def test_missing_shard(clip_folder):
    state = load_file(clip_folder / "model.safetensors")
    (clip_folder / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, clip_folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (clip_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = load_error(clip_folder)
    assert "model-00002-of-00002.safetensors" in msg


def test_unsupported_config(clip_folder):
    config_path = clip_folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    msg = load_error(clip_folder)
    assert "config.json" in msg and "BertModel" in msg
    config_path.write_text(json.dumps({**config, "hidden_act": "relu"}))
    msg = load_error(clip_folder)
    assert "config.json" in msg and "hidden_act='relu'" in msg
    config_path.unlink()
    assert "config.json" in load_error(clip_folder)


def test_t5_tie_conflict(tmp_path):
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                                feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    transformers.T5EncoderModel(cfg).save_pretrained(tmp_path)
    edit_state(tmp_path, lambda s: s.update({"encoder.embed_tokens.weight": torch.zeros(50, 16)}))
    msg = load_error(tmp_path)
    assert "shared.weight" in msg and "encoder.embed_tokens.weight" in msg
