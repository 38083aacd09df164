"""train.py with a recorder, run in its place (`PYTHONPATH=. python tests/train_record.py ARGS`, or under
torchrun; tests/train_helpers.run_train(script=...) sets the path).

Every batch a rank reads (flash.data.Stream.batch) is appended to OUT.seen-RANK.jsonl (beside the run
folder: train.py refuses foreign files inside it) as one line: its stream positions, captions, image
shape, each sample's SizeInfo, and the size conditioning the denoiser received for it (SDXL's time_ids,
PixArt's resolution and aspect_ratio, from train.encode_text). tests/test_shards.py reads these to check
which samples each rank saw and what conditioning they got.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import flash.data
import train


def install_recorder(out):
    path = Path(out).parent / f"{Path(out).name}.seen-{os.environ.get('RANK', '0')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    log, last = open(path, "a"), {}

    batch = flash.data.Stream.batch

    def recorded_batch(self, positions):
        images, captions, sizes = batch(self, positions)
        last.update(positions=list(positions), captions=captions, shape=list(images.shape),
                    sizes=[dataclasses.asdict(s) for s in sizes])
        return images, captions, sizes
    flash.data.Stream.batch = recorded_batch

    encode_text = train.encode_text

    def recorded_encode_text(pipe, prompts, resolution, **kw):
        out = encode_text(pipe, prompts, resolution, **kw)
        if not isinstance(resolution, int):      # a training batch's conditioning (not the unconditional one)
            added = out.get("added_cond") or {}
            keys = ("time_ids", "resolution", "aspect_ratio")
            log.write(json.dumps({**last, **{k: added[k].tolist() for k in keys if k in added}}) + "\n")
            log.flush()
        return out
    train.encode_text = recorded_encode_text


if __name__ == "__main__":
    install_recorder(sys.argv[sys.argv.index("--out") + 1])
    train.main()
