#!/usr/bin/env bash
# Rebuild the shipped default, weights/digits/, from scratch with the project's own scripts: a tiny latent
# text-to-image teacher trained on the real MNIST digits, Flash-distilled to a 4-step LoRA student.
#
#     recipes/digits.sh                 # the full recipe: ~42 min of training + 8 min eval on 2 CPU cores (docs/results.md)
#     recipes/digits.sh --quick         # a few steps of every stage, into runs/digits-quick (CI smoke test)
#     recipes/digits.sh vae teacher     # only these stages (init vae teacher flash ship eval), e.g. to redo one
#
# Stages (each reads the previous stage's output folder under $RUN):
#   init     recipes/digits_init.py: the random-init SD-layout pipeline (VAE f=4, tiny CLIP, small UNet)
#   vae      recipes/train_vae.py: L1 + L2 + 1e-4 KL autoencoder, then scaling_factor = 1 / latent std
#   teacher  train.py --objective diffusion: full fine-tune of the UNet (VAE and text encoder frozen), eps loss,
#            10% caption dropout for CFG
#   teacher2 the same, continued with --train-text-encoder: with the random frozen text encoder the digit word
#            moved the states by ~10% only, and after `teacher` CFG 3 and CFG 0 gave nearly the same digits
#            (the prompt was mostly ignored); training the text encoder too makes the prompt count
#   flash    train.py --objective flash: LoRA student, distillation + DMD + adversarial, warm-up + 3 phases
#   ship     the teacher pipeline in fp16 + the LoRA as weights/digits/flash_lora.safetensors, and the README
#            picture docs/digits_samples.png (teacher 25 / 4 steps and student 1 / 2 / 4 steps, same noise)
#   eval     eval.py --rows: the README table
#
# Deviations from docs/method.md (SD1.5 numbers), all because the model is ~1000x smaller and the budget is
# ~40 CPU-minutes instead of GPU-days:
#   - phase length FLASH_STEPS / 4 (100 batches) instead of 2500, batch 32 instead of 2 x 8 GPUs x 4 x accum;
#   - lr 3e-4 instead of 1e-5: a rank-16 LoRA on a 4M-parameter UNet, over a few hundred steps, does not move
#     at 1e-5 (the released SD adapters saw 20k+ steps);
#   - LoRA rank 16 / alpha 16 instead of 128 / 128: the UNet's widest layer has 128 channels;
#   - teacher guidance U[2, 4] instead of U[3, 13]: this teacher's samples saturate above ~5 (its CFG scale
#     for the README table is 3);
#   - K = 16 (the paper's PixArt value) instead of 32: the teacher target runs K - i DPM-Solver steps with CFG,
#     the dominant cost of a step on CPU; the 4 modes stay at t = 999, 749, 499, 249.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}     # 1: on a shared 2-core machine 2 threads spin-wait (5x slower)

QUICK=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    init|vae|teacher|teacher2|flash|ship|eval) STAGES+=("$a") ;;
    *) echo "digits.sh: unknown argument $a (--quick, or stages: init vae teacher teacher2 flash ship eval)" >&2
       exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(init vae teacher teacher2 flash ship eval)

if [ $QUICK = 1 ]; then          # every stage for a handful of steps: tests that the plumbing works, not quality
  RUN=${RUN:-runs/digits-quick}; DEST=${DEST:-$RUN/digits}; PICTURE=${PICTURE:-$RUN/samples.png}
  VAE_STEPS=${VAE_STEPS:-3}; TEACHER_STEPS=${TEACHER_STEPS:-3}; TEACHER2_STEPS=${TEACHER2_STEPS:-2}; FLASH_STEPS=${FLASH_STEPS:-4}; EVAL_N=${EVAL_N:-10}; EVAL_REAL=20
  BATCH=4; FLASH_BATCH=2; SAMPLE_EVERY=0
else
  RUN=${RUN:-runs/digits}; DEST=${DEST:-weights/digits}; PICTURE=${PICTURE:-docs/digits_samples.png}
  VAE_STEPS=${VAE_STEPS:-250}; TEACHER_STEPS=${TEACHER_STEPS:-1200}; TEACHER2_STEPS=${TEACHER2_STEPS:-600}; FLASH_STEPS=${FLASH_STEPS:-400}
  EVAL_N=${EVAL_N:-1000}; EVAL_REAL=500; BATCH=64; FLASH_BATCH=32; SAMPLE_EVERY=500
fi
PROMPTS=("a handwritten digit zero" "a handwritten digit one" "a handwritten digit two" "a handwritten digit three"
         "a handwritten digit four" "a handwritten digit five" "a handwritten digit six" "a handwritten digit seven"
         "a handwritten digit eight" "a handwritten digit nine")     # flash.data.caption_for(0..9)
mkdir -p "$RUN" "$(dirname "$PICTURE")"

stage() {   # stage NAME COMMAND...: run it, append its wall time to $RUN/times.txt
  local name=$1 t0; shift
  t0=$(date +%s)
  echo "== $name: $*"
  "$@"
  echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$RUN/times.txt"
}

for s in "${STAGES[@]}"; do
  case $s in
    init) stage init $PY recipes/digits_init.py --out "$RUN/init" --seed 0 ;;
    vae) stage vae $PY recipes/train_vae.py --model "$RUN/init" --data digits --out "$RUN/vae" \
           --steps $VAE_STEPS --batch-size $BATCH --lr 1e-3 --kl-weight 1e-4 ;;
    teacher) stage teacher $PY train.py --objective diffusion --model "$RUN/vae/final" --data digits \
           --out "$RUN/teacher" --steps $TEACHER_STEPS --batch-size $BATCH --lr 4e-4 --clip-grad 1 \
           --caption-dropout 0.1 --guidance 3 3 --checkpoint-every 500 --sample-every $SAMPLE_EVERY \
           --sample-prompts "${PROMPTS[@]}" ;;
    teacher2) stage teacher2 $PY train.py --objective diffusion --model "$RUN/teacher/final" --data digits \
           --out "$RUN/teacher2" --steps $TEACHER2_STEPS --batch-size $BATCH --lr 4e-4 --clip-grad 1 \
           --caption-dropout 0.1 --guidance 3 3 --train-text-encoder --checkpoint-every 500 \
           --sample-every $SAMPLE_EVERY --sample-prompts "${PROMPTS[@]}" ;;
    flash) stage flash $PY train.py --objective flash --model "$RUN/teacher2/final" --data digits \
           --out "$RUN/flash" --steps $FLASH_STEPS --batch-size $FLASH_BATCH --lr 3e-4 --clip-grad 1 \
           --lora-rank 16 --lora-alpha 16 --K 16 --guidance 2 4 --phase-len $(( (FLASH_STEPS + 3) / 4 )) \
           --checkpoint-every 200 --sample-every $(( SAMPLE_EVERY ? FLASH_STEPS : 0 )) \
           --sample-prompts "${PROMPTS[@]:0:5}" ;;
    ship) stage ship $PY - "$RUN" "$DEST" <<'EOF'
"""The teacher pipeline in fp16 plus the Flash LoRA (diffusers format) as DEST/flash_lora.safetensors."""
import shutil, sys
from pathlib import Path
import torch
from weights import load_pipeline, read_safetensors, write_safetensors
from weights.save import folder_size, save_pipeline
run, dest = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(dest, ignore_errors=True)
save_pipeline(load_pipeline(run / "teacher2" / "final"), dest, dtype=torch.float16)
lora = read_safetensors(run / "flash" / "final" / "pytorch_lora_weights.safetensors")
write_safetensors({k: v.half() for k, v in lora.items()}, dest / "flash_lora.safetensors")
print(f"wrote {dest} ({folder_size(dest) / 2**20:.1f} MiB)")
EOF
    stage picture $PY - "$DEST" "$PICTURE" <<'EOF'
"""README picture: rows teacher (DPM-Solver++ 2M, CFG 3) at 25 and 4 steps, then the student at 1, 2, 4
steps; columns the digits 0-9, each column from the same initial noise in every row."""
import sys
import numpy as np, torch
from PIL import Image
import weights
from flash.data import caption_for
from flash.lora import fuse_lora, load_lora, lora_disabled
from flash.pipeline import generate
dest, out = sys.argv[1], sys.argv[2]
pipe = weights.load_pipeline(dest, dtype=torch.float32)
load_lora(pipe.denoiser, f"{dest}/flash_lora.safetensors")
prompts = [caption_for(d) for d in range(10)]
def row(sampler, steps, guidance):
    gens = [torch.Generator().manual_seed(1000 + d) for d in range(10)]
    return generate(pipe, prompts, steps=steps, sampler=sampler, guidance=guidance, generator=gens, progress=False)
with lora_disabled(pipe.denoiser):
    rows = [row("dpm++2m", 25, 3.0), row("dpm++2m", 4, 3.0)]
fuse_lora(pipe.denoiser)
rows += [row("flash", s, 0.0) for s in (1, 2, 4)]
grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)         # (3, 5 * 32, 10 * 32)
img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(out)
print(f"wrote {out}")
EOF
    ;;
    eval) stage eval $PY eval.py --model "$DEST" --lora "$DEST/flash_lora.safetensors" --rows --n $EVAL_N --real $EVAL_REAL --no-progress \
           --json "$RUN/eval.json" ;;
  esac
done
