"""flash/tokenizer.py against transformers' CLIPTokenizer / T5Tokenizer and sentencepiece (test oracles), on
tokenizer folders written like a diffusers pipeline's, plus the shipped CLIP vocabulary's integrity."""
import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

from flash.tokenizer import load_tokenizer, read_spiece
from flash.io import CheckpointError

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB_DIR = Path(__file__).resolve().parents[1] / "weights" / "clip_vocab"

PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo Of A CAT",
    "an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation",
    "Hello,world!!!How's it going?I'm fine; you'll see -- they've gone, she'd say",
    "price: $1,299.99 (20% off) on 2024-06-01 at 10:30pm #sale @shop",
    "café crème brûlée, naïve façade, Ångström, Straße, ÉCOLE",
    "東京の夜景、ネオンサイン",
    "一只可爱的猫坐在窗台上",
    "강아지가 공원에서 뛰어놀고 있다",
    "emoji party 🎉🐱👩‍🚀 🇫🇷 ❤️",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs",
    "line one\nline two\r\nline three\n\n\nend",
    "UPPER lower MiXeD CaSe",
    "3.14159 2.71828 1e-5 0x1F 100000000",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a photo of a cat " * 40,  # far over 77 tokens: truncation
    ",".join(str(i) for i in range(60)),  # digits are single tokens: truncation inside numbers
    "<|startoftext|> a cat <|endoftext|> a dog",
    "A cat <|endoftext|>and a dog!",
    "mixed русский текст and ελληνικά and עברית",
    "math: ∑ x² ≤ ∞, α+β=γ, √2 ≈ 1.414",
    "quotes \"double\" 'single' `back` «guillemets» “curly”",
    "brackets [a] {b} (c) <d> |e| \\f/ ~g^",
    "fullwidth ＡＢＣ１２３ and ligature ﬁne ﬀ",
    "dog's owner's cars' wheels",
    "don't won't can't shouldn't",
    "trailing newline\n",
    "tab\tat\tevery\tword",
    "pixel art, 16-bit, sprite sheet, #ff00aa palette",
    "a red cube on top of a blue sphere, studio lighting, octane render, 4k uhd",
    "!!!???...,,,;;;",
    "e\u0301 composed vs \u00e9 precomposed",  # NFC folds the combining accent
    "zero\u200bwidth and non\u00a0breaking space",
]


def token_entry(text):  # special tokens as HF's special_tokens_map.json stores them
    return {"content": text, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_folder(folder, pad_token):
    """A pipeline's tokenizer/ (SD1.5: pad = <|endoftext|>) or tokenizer_2/ (SDXL: pad = "!") folder."""
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(VOCAB_DIR / name, folder / name)
    specials = {"bos_token": token_entry("<|startoftext|>"), "eos_token": token_entry("<|endoftext|>"),
                "unk_token": token_entry("<|endoftext|>"), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = dict(specials, model_max_length=77, do_lower_case=True, errors="replace",
                  add_prefix_space=False, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd15": write_clip_folder(root / "sd15" / "tokenizer", "<|endoftext|>"),
            "sdxl2": write_clip_folder(root / "sdxl" / "tokenizer_2", "!")}


def assert_same(ours, theirs, prompts, max_length):
    ids, mask = ours(prompts, max_length=max_length)
    ref = theirs(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    for i, p in enumerate(prompts):
        assert ids[i].tolist() == ref["input_ids"][i].tolist(), f"ids differ for {p!r}"
        assert mask[i].tolist() == ref["attention_mask"][i].tolist(), f"mask differs for {p!r}"
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(prompts), max_length)


# ------------------------------------------------------------------------------------------------ CLIP

def test_clip_vocab_files():
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894 and len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    # Layout: 256 byte chars, the same with </w>, then one token per merge in merge order.
    tokens = sorted(vocab, key=vocab.get)
    assert all(tokens[256 + i] == tokens[i] + "</w>" for i in range(256))
    assert all(tokens[512 + i] == line.replace(" ", "") for i, line in enumerate(lines[1:]))
    assert (VOCAB_DIR / "LICENSE").read_text().startswith("MIT License") and (VOCAB_DIR / "NOTICE").is_file()


def test_clip_known_ids(clip_folders):
    tok = load_tokenizer(clip_folders["sd15"])
    ids, mask = tok("a photo of a cat")
    assert ids.shape == (1, 77) and tok.model_max_length == 77
    # The ids every SD1.5 user has seen (OpenAI's tokenizer), pad = eos.
    assert ids[0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407]
    assert mask[0].tolist() == [1] * 7 + [0] * 70
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.decode(ids[0]) == "a photo of a cat"
    xl = load_tokenizer(clip_folders["sdxl2"])
    assert xl.pad_token_id == 0 and xl("a photo of a cat")[0][0, 6:9].tolist() == [49407, 0, 0]


@pytest.mark.parametrize("name", ["sd15", "sdxl2"])
def test_clip_matches_transformers(clip_folders, name):
    ours = load_tokenizer(clip_folders[name])
    theirs = transformers.CLIPTokenizer.from_pretrained(clip_folders[name])
    assert theirs.pad_token_id == ours.pad_token_id
    assert_same(ours, theirs, PROMPTS, 77)
    assert_same(ours, theirs, PROMPTS, 12)  # short length: most prompts truncate, bos and eos kept
    ids, mask = ours(PROMPTS[18])
    assert mask.sum() == 77 and ids[0, -1] == 49407 and ids[0, 0] == 49406


def openai_clip_reference(text, vocab, ranks):
    """OpenAI's simple_tokenizer algorithm, written out in plain Python (independent of `tokenizers`)."""
    import regex
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_char = {b: chr(b) for b in printable}
    byte_char.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in byte_char)})
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    ids = [49406]
    for word in regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text):
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:  # merge the best-ranked adjacent pair everywhere, until none is mergeable
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[s] for s in symbols]
    return ids + [49407]


def test_clip_matches_plain_python_bpe(clip_folders):
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
    tok = load_tokenizer(clip_folders["sd15"])
    for p in PROMPTS:
        if "<|" in p or "\u200b" in p:  # special-token text and zero-width chars: the two whitespace rules differ
            continue
        assert tok.encode(p) == openai_clip_reference(p, vocab, ranks), p


def test_clip_tokenizer_json(clip_folders, tmp_path):
    theirs = transformers.CLIPTokenizer.from_pretrained(clip_folders["sdxl2"])
    theirs.save_pretrained(tmp_path / "tokenizer_2")  # transformers 5 writes tokenizer.json + tokenizer_config.json
    assert not (tmp_path / "tokenizer_2" / "vocab.json").exists()
    ours = load_tokenizer(tmp_path / "tokenizer_2")
    assert (ours.pad_token_id, ours.model_max_length) == (0, 77)
    assert_same(ours, theirs, PROMPTS, 77)


# -------------------------------------------------------------------------------------------------- T5

def make_corpus(path):
    rng = random.Random(0)
    syllables = "ka ri to na me so lu pi de gra stro phon tel vis ing ed er ly tion ous ment al".split()
    words = ("a photo of cat dog astronaut riding horse on the moon painting by van gogh cinematic lighting highly "
             "detailed city street at night portrait woman man red blue green café naïve über 東京 猫").split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = []
    for _ in range(3000):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        s = s.capitalize() + "," if rng.random() < 0.3 else s
        s = s + " " + str(rng.randint(0, 2024)) if rng.random() < 0.3 else s
        lines.append(s + rng.choice([".", "!", "?", ""]))
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """PixArt's tokenizer/ folder layout (spiece.model + configs), with a 500-piece unigram model trained
    here using T5's special ids: pad 0, eos 1, unk 2, no bos."""
    root = tmp_path_factory.mktemp("t5")
    make_corpus(root / "corpus.txt")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=500,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder = root / "pixart" / "tokenizer"
    folder.mkdir(parents=True)
    shutil.copy(root / "sp.model", folder / "spiece.model")
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(specials, extra_ids=100, model_max_length=512,
                                                                  tokenizer_class="T5Tokenizer")))
    return folder


def test_read_spiece_matches_protobuf(t5_folder):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((t5_folder / "spiece.model").read_bytes())
    ours = read_spiece(t5_folder / "spiece.model")
    assert ours.pieces == [(p.piece, p.score, p.type) for p in proto.pieces]
    assert len(ours.pieces) == 500 and ours.pieces[1] == ("</s>", 0.0, 3)
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (t.unk_id, t.bos_id, t.eos_id, t.pad_id) \
        == (2, -1, 1, 0)
    assert ours.precompiled_charsmap == n.precompiled_charsmap and len(ours.precompiled_charsmap) > 1000
    assert (ours.model_type, ours.add_dummy_prefix, ours.remove_extra_whitespaces) == (1, True, True)


def test_t5_matches_transformers(t5_folder):
    ours = load_tokenizer(t5_folder)
    theirs = transformers.T5Tokenizer.from_pretrained(t5_folder)
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (0, 1, None)
    assert ours.vocab_size == len(theirs) == 600 and ours.model_max_length == 512
    prompts = PROMPTS + ["a cat <extra_id_0> on the moon </s> x", "Über den Wolken 2024!"]
    assert_same(ours, theirs, prompts, 120)  # PixArt's length
    assert_same(ours, theirs, prompts, 8)
    ids, mask = ours("a photo of a cat", max_length=120)
    assert ids.shape == (1, 120) and ids[0, mask[0].sum() - 1] == 1 and ids[0, -1] == 0


def test_t5_matches_sentencepiece(t5_folder):
    ours = load_tokenizer(t5_folder)
    sp = spm.SentencePieceProcessor(model_file=str(t5_folder / "spiece.model"))
    for p in PROMPTS:
        if "<|" in p or "\u200b" in p:
            continue
        assert ours.encode(p) == sp.encode(p) + [1], p
    assert ours.decode(ours("A photo of a cat riding a horse")[0]) == ["A photo of a cat riding a horse"]


def test_t5_without_sentinels_and_from_tokenizer_json(t5_folder, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(t5_folder, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.update(extra_ids=0, additional_special_tokens=[])
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "special_tokens_map.json").unlink()
    ours = load_tokenizer(plain, max_length=120)
    theirs = transformers.T5Tokenizer.from_pretrained(plain)
    assert ours.vocab_size == len(theirs) == 500 and ours.model_max_length == 120
    assert_same(ours, theirs, PROMPTS, 120)

    theirs = transformers.T5Tokenizer.from_pretrained(t5_folder)
    theirs.save_pretrained(tmp_path / "json")
    assert not (tmp_path / "json" / "spiece.model").exists()
    from_json = load_tokenizer(tmp_path / "json", max_length=120)
    assert (from_json.kind, from_json.pad_token_id, from_json.eos_token_id) == ("t5", 0, 1)
    assert_same(from_json, theirs, PROMPTS, 120)


# ---------------------------------------------------------------------------------------------- errors

def test_errors(tmp_path, clip_folders):
    import weights
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        weights.load_tokenizer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "missing")
    pipeline_root = clip_folders["sd15"].parent
    with pytest.raises(CheckpointError, match="tokenizer/ subfolder"):
        load_tokenizer(pipeline_root)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spiece.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(CheckpointError, match="spiece.model"):
        load_tokenizer(tmp_path / "bad")
    tok = load_tokenizer(clip_folders["sd15"])
    with pytest.raises(ValueError, match="max_length"):
        tok("a cat", max_length=1)
    with pytest.raises(ValueError, match="texts"):
        tok(["a cat", None])
