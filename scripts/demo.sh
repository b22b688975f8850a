#!/usr/bin/env bash
# The main job, offline on CPU: phantom shards -> LoRA on the shipped phantom base with 2 CPU ranks ->
# samples -> text-faithfulness of the base and of the adapter, side by side.
# Shorter runs (CI): DEMO_N, DEMO_STEPS, DEMO_EVAL_SAMPLES, DEMO_SAMPLE_STEPS, DEMO_ROOT override the defaults.
# Training stops at the demo preset's wall-clock budget (train.time_budget with the warm-up / stable / decay
# schedule) or its step count, whichever comes first: on a slow host it ends on time with fewer steps.
# DEMO_TIME_BUDGET (minutes or HH:MM:SS) replaces the budget; DEMO_TIME_BUDGET= (empty) trains every step.
# DEMO_BASE=models/phantom-sana runs it on the Sana-family phantom base with the demo-sana preset (DEMO_CONFIG picks
# another preset), in its own shard, run and output folders (its latents come from its own autoencoder).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${DEMO_N:-5000}
BASE=${DEMO_BASE:-models/phantom-base}
# the base's family picks the preset: demo (UNet) or demo-<family>, e.g. demo-sana
CONFIG=${DEMO_CONFIG:-$(python -c "import sys; from cxrdist.models.families import family_of; f = family_of(sys.argv[1]).name; print('demo' if f == 'sd' else 'demo-' + f)" "$BASE")}
SUFFIX=${CONFIG#demo}
# the demo preset (cxrdist/presets/demo.yaml) holds the default training and sampler step counts; DEMO_STEPS and
# DEMO_SAMPLE_STEPS override them.
preset() { python -c "import operator, sys; from cxrdist.config import load_config; print(operator.attrgetter(sys.argv[2])(load_config(sys.argv[1])))" "$CONFIG" "$1"; }
STEPS=${DEMO_STEPS:-$(preset train.max_steps)}
EVAL_SAMPLES=${DEMO_EVAL_SAMPLES:-128}
SAMPLE_STEPS=${DEMO_SAMPLE_STEPS:-$(preset sample.steps)}
ROOT=${DEMO_ROOT:-.}
SHARDS="$ROOT/shards/phantom$SUFFIX"
RUN="$ROOT/runs/$CONFIG"
OUT="$ROOT/outputs/$CONFIG"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
step() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - started )); }

step "1/5 phantom shards ($N studies) -> $SHARDS"
if [ -f "$SHARDS/index.json" ]; then
  echo "reusing $SHARDS"
else
  cxrdist shard phantom --n "$N" --size 64 --seed 0 --folds 5 --out "$SHARDS"
fi
if ! grep -q '"latents"' "$SHARDS/index.json"; then
  cxrdist shard cache-latents "$SHARDS" --pretrained "$BASE"
fi

BUDGET=${DEMO_TIME_BUDGET-$(preset train.time_budget)}
BUDGET_SETS=(--set train.time_budget="$BUDGET")
if [ -n "$BUDGET" ]; then
  BUDGET_SETS+=(--set optim.scheduler=wsd)
  step "2/5 LoRA training, fold 0 held out, 2 CPU ranks (a $BUDGET budget, at most $STEPS steps) -> $RUN"
else
  step "2/5 LoRA training, fold 0 held out, 2 CPU ranks ($STEPS steps) -> $RUN"
fi
trained_from=$(date +%s)
# One thread per rank: two ranks on two cores, each spinning two threads, run many times slower.
OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/cpu_2ranks.yaml launch/train.py \
  --config "$CONFIG" --fold 0 --shards "$SHARDS" --pretrained "$BASE" --output-dir "$RUN" \
  --set train.max_steps="$STEPS" --set optim.warmup_steps=$(( STEPS / 20 )) --set eval.eval_every_steps=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 )) \
  --set train.checkpoint_every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 )) "${BUDGET_SETS[@]}"
# the newest checkpoint is the last step (the trainer checkpoints the final step; keep_last keeps the newest)
LAST=$(ls -d "$RUN/fold0/checkpoints"/step_* 2>/dev/null | tail -n 1 || true)
if [ -n "$LAST" ]; then
  echo "trained $(( 10#${LAST##*step_} )) of at most $STEPS steps in $(( $(date +%s) - trained_from )) s" \
    "(launch, text cache, validations and the test split included)"
fi
if [ -f "$RUN/fold0/time_budget.json" ]; then
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"time budget: the decay began after step {r['step']} and training ended at step {r['end_step']} of at most {r['max_steps']}\")" "$RUN/fold0/time_budget.json"
elif [ -n "$BUDGET" ]; then
  echo "time budget: every step fit in $BUDGET; the schedule decayed over its last steps as planned"
fi
BEST=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$RUN/fold0/test_metrics.json")

step "3/5 samples for example reports -> $OUT/samples"
rm -rf "$OUT/samples"
cxrdist sample --model-path "$BEST" --out "$OUT/samples" --num-images 2 --steps "$SAMPLE_STEPS" \
  --description "Normal heart size. Lungs are clear. No pleural effusion or pneumothorax." \
  --description "Moderate cardiomegaly. No pleural effusion or pneumothorax." \
  --description "Large left pleural effusion. Heart size is normal. No pneumothorax." \
  --description "Right apical pneumothorax. No pleural effusion. Normal cardiac silhouette." \
  --description "A nodule in the right upper lobe. Heart size normal. No effusion or pneumothorax."

step "4/5 text faithfulness on held-out test reports: base vs adapter"
cxrdist evaluate --model-path "$BASE" --model-path "$BEST" --shards "$SHARDS" --split test \
  --max-samples "$EVAL_SAMPLES" --steps "$SAMPLE_STEPS" --out "$OUT/evaluate.json" --report "$OUT/report.html"

step "5/5 done"
echo "adapter:      $BEST"
echo "samples:      $OUT/samples (grid.png, index.jsonl)"
echo "evaluation:   $OUT/evaluate.json, $OUT/report.html (open it in a browser)"
echo "TensorBoard:  tensorboard --logdir $RUN"
