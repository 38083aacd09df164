#!/usr/bin/env bash
# Rebuild the shipped task demos, weights/digits-{inpaint,upscale,adapter}/, from the text-to-image digits
# teacher (recipes/digits.sh, stage teacher2): for each task a teacher fine-tuned for its image condition,
# then Flash-distilled to a 4-step LoRA student with the text-to-image recipe unchanged.
#
#     recipes/digits_tasks.sh                          # every task, every stage (docs/results.md: times)
#     recipes/digits_tasks.sh --quick                  # a few steps of each stage, into runs/digits-tasks-quick
#     recipes/digits_tasks.sh inpaint teacher flash    # only these tasks / stages
#
# Stages, per task (each reads the previous one's folder under $RUN/<task>):
#   init     recipes/digits_tasks_init.py: the teacher's UNet widened with zero-initialised input channels
#            (inpaint: mask + masked-image latent; upscale: the low-res latent), or a zero-output T2I-Adapter
#   teacher  train.py --objective diffusion: inpaint / upscale fine-tune the whole UNet on their condition
#            (random box masks; 2x or 4x area-downsampled digits); adapter trains the adapter alone on Sobel
#            edge maps, the UNet frozen
#   flash    train.py --objective flash: the digits recipe's settings (recipes/digits.sh; its header lists the
#            deviations from docs/method.md), the adapter frozen, the condition in both CFG branches
#   ship     the task's own component in fp16 (unet/ or adapter/) + model_index.json pointing at
#            weights/digits for the shared VAE, text encoder, tokenizer and scheduler ("flash_base"), and the
#            LoRA as flash_lora.safetensors
#   picture  docs/digits_tasks.png: per task, rows input / teacher 25 steps / student 4 steps
#   eval     eval.py --task T --rows: the docs/results.md table rows
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}     # 1: on a shared 2-core machine 2 threads spin-wait

QUICK=0
TASKS=()
STAGES=()
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    inpaint|upscale|adapter) TASKS+=("$a") ;;
    init|teacher|flash|ship|picture|eval) STAGES+=("$a") ;;
    *) echo "digits_tasks.sh: unknown argument $a (--quick; tasks: inpaint upscale adapter;" \
            "stages: init teacher flash ship picture eval)" >&2
       exit 2 ;;
  esac
done
[ ${#TASKS[@]} -eq 0 ] && TASKS=(inpaint upscale adapter)
[ ${#STAGES[@]} -eq 0 ] && STAGES=(init teacher flash ship picture eval)

if [ $QUICK = 1 ]; then
  RUN=${RUN:-runs/digits-tasks-quick}; DEST=${DEST:-$RUN/weights}; PICTURE=${PICTURE:-$RUN/tasks.png}
  BASE=${BASE:-runs/digits-quick/teacher2/final}; SHIPPED_BASE=${SHIPPED_BASE:-runs/digits-quick/digits}
  TEACHER_STEPS=${TEACHER_STEPS:-2}; FLASH_STEPS=${FLASH_STEPS:-4}
  EVAL_N=${EVAL_N:-10}; EVAL_REAL=20; BATCH=4; FLASH_BATCH=2
else
  RUN=${RUN:-runs/digits-tasks}; DEST=${DEST:-weights}; PICTURE=${PICTURE:-docs/digits_tasks.png}
  BASE=${BASE:-runs/digits/teacher2/final}; TEACHER_STEPS=${TEACHER_STEPS:-600}; FLASH_STEPS=${FLASH_STEPS:-400}
  EVAL_N=${EVAL_N:-500}; EVAL_REAL=500; BATCH=64; FLASH_BATCH=32
fi
# The widened UNets are fine-tuned at the text-to-image teacher's lr / 2; the adapter starts from zero
# output and trains alone, at a higher lr (1e-3).
declare -A TEACHER_LR=([inpaint]=2e-4 [upscale]=2e-4 [adapter]=1e-3)
SHIPPED_BASE=${SHIPPED_BASE:-$DEST/digits}      # the folder the shipped demos take their shared parts from
mkdir -p "$RUN" "$(dirname "$PICTURE")"

stage() {   # stage NAME COMMAND...: run it, append its wall time to $RUN/times.txt
  local name=$1 t0; shift
  t0=$(date +%s)
  echo "== $name: $*"
  "$@"
  echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$RUN/times.txt"
}

for t in "${TASKS[@]}"; do
  for s in "${STAGES[@]}"; do
    case $s in
      init) stage "$t init" $PY recipes/digits_tasks_init.py --base "$BASE" --task "$t" --out "$RUN/$t/init" ;;
      teacher) stage "$t teacher" $PY train.py --objective diffusion --model "$RUN/$t/init" --data digits \
             --out "$RUN/$t/teacher" --steps $TEACHER_STEPS --batch-size $BATCH --lr "${TEACHER_LR[$t]}" --clip-grad 1 \
             --caption-dropout 0.1 --guidance 3 3 --checkpoint-every 200 ;;
      flash) stage "$t flash" $PY train.py --objective flash --model "$RUN/$t/teacher/final" --data digits \
             --out "$RUN/$t/flash" --steps $FLASH_STEPS --batch-size $FLASH_BATCH --lr 3e-4 --clip-grad 1 \
             --lora-rank 16 --lora-alpha 16 --K 16 --guidance 2 4 --phase-len $(( (FLASH_STEPS + 3) / 4 )) \
             --checkpoint-every 200 ;;
      ship) stage "$t ship" $PY - "$RUN/$t" "$DEST/digits-$t" "$SHIPPED_BASE" <<'EOF'
"""The task's own component in fp16, sharing the rest with the shipped text-to-image folder, + the LoRA."""
import shutil, sys
from pathlib import Path
import torch
from weights import load_pipeline, read_safetensors, write_safetensors
from weights.save import folder_size, save_pipeline
run, dest, base = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
shutil.rmtree(dest, ignore_errors=True)
save_pipeline(load_pipeline(run / "teacher" / "final"), dest, dtype=torch.float16, base=base)
lora = read_safetensors(run / "flash" / "final" / "pytorch_lora_weights.safetensors")
write_safetensors({k: v.half() for k, v in lora.items()}, dest / "flash_lora.safetensors")
print(f"wrote {dest} ({folder_size(dest) / 2**20:.1f} MiB)")
EOF
      ;;
      picture) stage "$t picture" $PY recipes/digits_tasks_picture.py --model "$DEST/digits-$t" \
             --out "$RUN/$t/picture.png" ;;
      eval) stage "$t eval" $PY eval.py --task "$t" --model "$DEST/digits-$t" --rows --n $EVAL_N --real $EVAL_REAL \
             --no-progress --json "$RUN/$t/eval.json" ;;
    esac
  done
done
if [[ " ${STAGES[*]} " == *" picture "* ]]; then      # the three task pictures, one under the other
  $PY recipes/digits_tasks_picture.py --stack "$PICTURE" "${TASKS[@]/#/$RUN/}"
fi
