"""Text tokenizers of the text encoders: CLIP's byte-level BPE (SD1.5, SDXL's two encoders) and T5's
SentencePiece unigram (PixArt-alpha), built on the `tokenizers` library.

Upstream followed:
- CLIP: OpenAI's `simple_tokenizer.py` as Hugging Face's CLIPTokenizer reproduces it (ids are tested equal):
  NFC + whitespace runs -> one space + lowercase; CLIP's regex splits words, single digits, punctuation runs
  and English contractions; each word is BPE-merged over its UTF-8 bytes (GPT-2's byte -> printable char
  map) with `</w>` marking the word's last symbol. Sequence = `<|startoftext|>` (49406) + tokens +
  `<|endoftext|>` (49407), padded to 77 with `<|endoftext|>` (SD1.5) or `!` (id 0, SDXL's tokenizer_2,
  read from the folder's special_tokens_map.json / tokenizer_config.json).
- T5: SentencePiece's unigram model read from `spiece.model`, a protobuf parsed here by a small wire-format
  reader (no protobuf package). Text goes through the model's precompiled NFKC char map, is split on
  whitespace, and each word gets the `▁` prefix (SentencePiece's add_dummy_prefix + remove_extra_whitespaces,
  as HF's T5Tokenizer does it); the Viterbi segmentation uses the pieces' log-probabilities. Sequence =
  tokens + `</s>` (1), padded with `<pad>` (0); no bos. The 100 `<extra_id_N>` sentinels T5 appends to the
  vocabulary are added too (count from tokenizer_config.json's `extra_ids`, default 100 like HF).

A folder's `tokenizer.json` (HF's serialised pipeline) is used when the source files above are absent.

Deviations: the special tokens are added by our code, not by a post-processor, so a tokenizer.json's
post-processor is ignored (both HF pipelines add exactly these tokens); OpenAI's ftfy/html clean-up before
tokenizing is not done (HF skips it too); like HF, a pad token other than bos/eos (SDXL's "!") is a special
token, so "!" in a prompt is id 0 rather than BPE-merged (kept for parity with diffusers' SDXL prompts).
SentencePiece models with add_dummy_prefix or remove_extra_whitespaces switched off, byte fallback, or BPE
type are refused rather than approximated.
"""
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, Unigram

from flash.io import CheckpointError, read_bytes, read_json, read_text

# OpenAI's pattern: contractions, letter runs, ONE digit per token, runs of other non-space symbols.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS, CLIP_EOW = "<|startoftext|>", "<|endoftext|>", "</w>"


class TextTokenizer:
    """text(s) -> (input_ids, attention_mask), both LongTensor (B, max_length), always padded to max_length.

    `backend` is a `tokenizers.Tokenizer` that maps text to content tokens only; the special tokens,
    truncation and padding are done here so the rule is in view: [bos] + content[:room] + [eos] + pads,
    where room = max_length - number of specials, so truncation never drops bos or eos (like HF's).
    """

    def __init__(self, backend, kind, model_max_length, pad_token_id, eos_token_id, bos_token_id=None):
        self.backend, self.kind, self.model_max_length = backend, kind, model_max_length
        self.pad_token_id, self.eos_token_id, self.bos_token_id = pad_token_id, eos_token_id, bos_token_id
        # Truncation/padding stored in a tokenizer.json would fight ours.
        backend.no_truncation()
        backend.no_padding()

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """One text -> list of ids with bos/eos, no truncation or padding."""
        head = [] if self.bos_token_id is None else [self.bos_token_id]
        return head + self.backend.encode(text, add_special_tokens=False).ids + [self.eos_token_id]

    def __call__(self, texts, max_length=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts: expected a str or a list of str, got {[type(t).__name__ for t in texts]}")
        length = max_length or self.model_max_length
        head = [] if self.bos_token_id is None else [self.bos_token_id]
        room = length - len(head) - 1
        if room < 0:
            raise ValueError(f"max_length={length} leaves no room for the {len(head) + 1} special tokens")
        input_ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
        for i, enc in enumerate(self.backend.encode_batch(texts, add_special_tokens=False)):
            row = head + enc.ids[:room] + [self.eos_token_id]
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        return input_ids, attention_mask

    def decode(self, ids):
        """ids (a list, or a 1-D / 2-D tensor) -> text(s). Stops at the first eos, so pads (which may be a
        real token such as SDXL's "!") are never decoded."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        ids = list(ids)
        if self.eos_token_id in ids:
            ids = ids[:ids.index(self.eos_token_id)]
        ids = [i for i in ids if i != self.bos_token_id]
        text = self.backend.decode(ids, skip_special_tokens=True)
        if self.kind == "clip":  # the ByteLevel decoder keeps the end-of-word marks: they are the spaces
            text = text.replace(CLIP_EOW, " ").strip()
        return text

    def __repr__(self):
        return (f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, model_max_length="
                f"{self.model_max_length}, bos={self.bos_token_id}, eos={self.eos_token_id}, pad={self.pad_token_id})")


# ---------------------------------------------------------------------------------------------- CLIP

def read_clip_vocab(vocab_path, merges_path):
    """vocab.json -> {token: id}; merges.txt -> [(left, right)] in priority order (header line skipped)."""
    try:
        vocab = read_json(vocab_path, "vocabulary")
        merges_text = read_text(merges_path, "merges file")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise CheckpointError(f"{vocab_path}: a vocabulary must be a JSON object of token -> integer id")
    merges = []
    for n, line in enumerate(merges_text.split("\n")):
        if not line.strip() or (n == 0 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise CheckpointError(f"{merges_path}: line {n + 1} is not a merge pair: {line[:40]!r}")
        merges.append(tuple(pair))
    return vocab, merges


def clip_tokenizer(vocab, merges, pad_token=CLIP_EOS, model_max_length=77):
    """CLIP's tokenizer from a {token: id} vocabulary and its merge list."""
    backend = Backend(BPE(vocab, merges, unk_token=CLIP_EOS, end_of_word_suffix=CLIP_EOW,
                          continuing_subword_prefix="", fuse_unk=False))
    # \s+ -> " " before lowercasing mirrors OpenAI's whitespace_clean(...).lower().
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    # invert=True: the regex matches are the words and the rest (spaces) is dropped. ByteLevel then maps each
    # word's UTF-8 bytes to printable chars; its own GPT-2 regex is off since CLIP's already split the text.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Matched after normalisation, so "<|ENDOFTEXT|>" in a prompt is the eos token too, as in OpenAI's (HF's
    # flag depends on how the folder's JSON spells the token; an upper-case special in a prompt is not tested).
    specials = [AddedToken(t, special=True, normalized=True) for t in (CLIP_BOS, CLIP_EOS)]
    if pad_token not in (CLIP_BOS, CLIP_EOS):
        # Upstream quirk kept for id parity: HF makes SDXL's pad "!" a special token, so every "!" in a prompt
        # is cut out as id 0 instead of being BPE-merged ("wow!!!" -> wow</w> ! ! !, not wow</w> !!!</w>).
        # diffusers' SDXL pipelines tokenize prompts that way, and so the text encoder 2 sees them that way.
        specials.append(AddedToken(pad_token, special=True, normalized=False))
    backend.add_special_tokens(specials)
    return _with_specials(backend, "clip", model_max_length, pad_token, CLIP_EOS, CLIP_BOS, "vocab.json")


def _with_specials(backend, kind, model_max_length, pad, eos, bos, source):
    ids = {}
    for name, token in (("pad_token", pad), ("eos_token", eos), ("bos_token", bos)):
        if token is not None:
            ids[name] = backend.token_to_id(token)
            if ids[name] is None:
                raise CheckpointError(f"{source}: {name} {token!r} is not in the vocabulary")
    return TextTokenizer(backend, kind, model_max_length, ids["pad_token"], ids["eos_token"], ids.get("bos_token"))


# ---------------------------------------------------------------------------------- SentencePiece / T5

@dataclass
class SentencePieceModel:
    """The fields of sentencepiece's ModelProto that a unigram tokenizer needs (proto defaults)."""
    pieces: list = field(default_factory=list)  # (piece, score, type); type 1 normal, 2 unk, 3 control, 4 user
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return result, pos


def _fields(buf):
    """Protobuf wire format: yields (field number, value) with value an int (varint), bytes (length-
    delimited: strings, sub-messages) or the raw 4 / 8 bytes of a fixed32 (float) / fixed64."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, value


def _int32(v):  # negative int32 fields (pad_id = -1) are varints of their 64-bit two's complement
    return v - (1 << 64) if v >= 1 << 63 else v


def read_spiece(path):
    """spiece.model (sentencepiece ModelProto) -> SentencePieceModel. Field numbers are those of
    sentencepiece_model.proto: ModelProto{1 pieces, 2 trainer_spec, 3 normalizer_spec},
    SentencePiece{1 piece, 2 score, 3 type}, TrainerSpec{3 model_type, 35 byte_fallback, 40-43 unk/bos/
    eos/pad ids}, NormalizerSpec{2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces}."""
    m = SentencePieceModel()
    try:
        for number, value in _fields(read_bytes(path, "sentencepiece model")):
            if number == 1:
                piece, score, kind = "", 0.0, 1
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                m.pieces.append((piece, score, kind))
            elif number == 2:
                trainer = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id",
                           43: "pad_id"}
                for n, v in _fields(value):
                    if n in trainer:
                        setattr(m, trainer[n], _int32(v) if n >= 40 else v)
            elif number == 3:
                for n, v in _fields(value):
                    if n == 2:
                        m.precompiled_charsmap = bytes(v)
                    elif n == 3:
                        m.add_dummy_prefix = bool(v)
                    elif n == 4:
                        m.remove_extra_whitespaces = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable sentencepiece model ({e})") from None
    if not m.pieces:
        raise CheckpointError(f"{path}: sentencepiece model with no pieces")
    return m


def t5_tokenizer(spm, extra_ids=100, model_max_length=512, source="spiece.model"):
    """T5's tokenizer from a SentencePieceModel (see read_spiece)."""
    if spm.model_type != 1 or spm.byte_fallback or not (spm.add_dummy_prefix and spm.remove_extra_whitespaces):
        raise CheckpointError(f"{source}: only plain unigram sentencepiece models (T5's kind) are supported "
                              f"(model_type={spm.model_type}, byte_fallback={spm.byte_fallback}, add_dummy_prefix="
                              f"{spm.add_dummy_prefix}, remove_extra_whitespaces={spm.remove_extra_whitespaces})")
    # T5 appends its sentinels after the pieces, highest first: <extra_id_99> gets id len(pieces).
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
    backend = Backend(Unigram([(p, s) for p, s, _ in spm.pieces] + [(t, 0.0) for t in sentinels], spm.unk_id, False))
    if spm.precompiled_charsmap:
        backend.normalizer = normalizers.Precompiled(spm.precompiled_charsmap)
    # Splitting on whitespace drops extra spaces; "always" gives every word the "▁" word-start mark.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Control (<pad>, </s>), unknown and user-defined pieces, and the sentinels, are matched whole in text.
    specials = [p for p, _, kind in spm.pieces if kind in (2, 3)] + sentinels
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(p, normalized=False) for p, _, kind in spm.pieces if kind == 4])
    name = lambda i: spm.pieces[i][0] if 0 <= i < len(spm.pieces) else None  # noqa: E731
    if name(spm.eos_id) is None or name(spm.pad_id) is None:
        raise CheckpointError(f"{source}: T5 needs eos and pad pieces (eos_id={spm.eos_id}, pad_id={spm.pad_id})")
    return _with_specials(backend, "t5", model_max_length, name(spm.pad_id), name(spm.eos_id), None, source)


# ------------------------------------------------------------------------------------------- folders

def _read_json(path):
    if not path.exists():
        return {}
    try:
        config = read_json(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object ({{...}}), got a {type(config).__name__}")
    return config


def _token(value):  # special tokens are stored as "text" or as {"content": "text", "lstrip": ..., ...}
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(folder, max_length=None):
    """A tokenizer folder (a pipeline's `tokenizer/`, `tokenizer_2/`) -> TextTokenizer.

    Kind from the files: vocab.json + merges.txt -> CLIP; spiece.model -> T5; else tokenizer.json (its
    model type: BPE -> CLIP, Unigram -> T5). Special tokens from tokenizer_config.json, overridden by
    special_tokens_map.json (that is where SDXL's tokenizer_2 says pad = "!"). Length: `max_length` if
    given, else the config's model_max_length when sane, else 77 (CLIP) / 512 (T5; PixArt asks for 120).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such tokenizer folder")
    config = _read_json(folder / "tokenizer_config.json")
    config.update(_read_json(folder / "special_tokens_map.json"))
    saved = config.get("model_max_length")  # HF writes 1e30 for "no limit"
    length = max_length or (int(saved) if isinstance(saved, (int, float)) and 0 < saved < 1e6 else None)
    pad = _token(config.get("pad_token"))

    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges = read_clip_vocab(folder / "vocab.json", folder / "merges.txt")
        return clip_tokenizer(vocab, merges, pad or CLIP_EOS, length or 77)
    if (folder / "spiece.model").is_file():
        return t5_tokenizer(read_spiece(folder / "spiece.model"), config.get("extra_ids", 100), length or 512,
                            str(folder / "spiece.model"))
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        model = _read_json(path).get("model")
        model_type = model.get("type") if isinstance(model, dict) else None
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({str(e)[:80]})") from None
        if model_type == "BPE":
            return _with_specials(backend, "clip", length or 77, pad or CLIP_EOS,
                                  _token(config.get("eos_token")) or CLIP_EOS,
                                  _token(config.get("bos_token")) or CLIP_BOS, str(path))
        if model_type == "Unigram":
            return _with_specials(backend, "t5", length or 512, pad or "<pad>",
                                  _token(config.get("eos_token")) or "</s>", None, str(path))
        raise CheckpointError(f"{path}: model type {model_type!r} is neither CLIP's BPE nor T5's Unigram")
    hint = [p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("tokenizer")]
    raise CheckpointError(f"{folder}: no tokenizer files (vocab.json + merges.txt, spiece.model or tokenizer.json)"
                          + (f"; for a pipeline folder pass its {hint[0]}/ subfolder" if hint else ""))
