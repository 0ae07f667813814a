#!/usr/bin/env bash
# The whole Patho-R1 recipe on a laptop, end to end:
#   set-up -> SynthPath (+ tokenizer) -> stage 0 base LM (two phases) and base vision tower (once, shared by
#   every seed) -> PathoCLIP
#   -> stage 1 pretrain (continues the base LM) -> stage 2 SFT -> stage 3 RL twice from the same
#   SFT model (GRPO, DAPO) -> evaluation -> out/report.md
#
#   bash speedrun.sh                      # toy preset, seed 0 (~70 min on 2 CPU cores, session 34: stage 0 ~22 min a
#                                         # try, up to 3 tries, 0v ~6, the seed ~42)
#   bash speedrun.sh --seeds 0,1,2        # three seeds: mean +- spread in the report (~42 min more a seed)
#   bash speedrun.sh --preset small       # one GPU
#   bash speedrun.sh --update_readme      # also rewrite README.md's results section from the report
#   bash speedrun.sh --base_tries 1       # one stage-0 seed (default 3: the next seed while its probe walk is < 0.8)
#   bash speedrun.sh --base_seed 1        # stage 0's (first) seed; the seeds above are the VLM stages'
#   PYTHON=python3.11 OUT=out DATA=data/synthpath bash speedrun.sh
#
# Every stage prints one summary line; logs are under $OUT/seed<k>/. A stage whose model is
# already there is skipped, and so is an evaluation newer than its model, so an interrupted speedrun
# continues where it stopped (rm -r out/ to start afresh).
set -euo pipefail
cd "$(dirname "$0")"

PRESET=toy
SEEDS=0
OUT=${OUT:-out}
DATA=${DATA:-data/synthpath}
PYTHON=${PYTHON:-python}
SKIP_SETUP=${SKIP_SETUP:-0}
README_FLAG=()
BASE_SEED=0
BASE_TRIES=3
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --skip_setup) SKIP_SETUP=1; shift ;;
    --update_readme) README_FLAG=(--readme README.md); shift ;;
    --base_seed) BASE_SEED=$2; shift 2 ;;
    --base_tries) BASE_TRIES=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$BASE_TRIES" =~ ^[1-9][0-9]*$ && "$BASE_SEED" =~ ^[0-9]+$ ]]; then
  echo "--base_tries wants a count >= 1 and --base_seed a seed >= 0 (got $BASE_TRIES and $BASE_SEED)" >&2; exit 2
fi

# ---------------------------------------------------------------- set-up
if [ "$SKIP_SETUP" != 1 ]; then
  if ! $PYTHON -c "import torch" 2>/dev/null; then
    # a CPU build where one is on disk; elsewhere the default build of torch
    $PYTHON -m pip install -q torch==2.13.0 || $PYTHON -m pip install -q "torch>=2.4"
  fi
  $PYTHON -m pip install -q -r requirements.txt matplotlib  # + the `plots` extra: the report draws curves.png
fi
mkdir -p "$OUT"

stage() {  # stage NAME LOGFILE CMD... : run, time, keep the log, print its summary line
  local name=$1 log=$2; shift 2
  if [ -f "$(dirname "$log")/$name/model.safetensors" ]; then  # finished by an earlier run: keep it
    echo "[$name] already done: $(dirname "$log")/$name"; return 0
  fi
  local t0=$SECONDS
  "$@" 2>&1 | tee "$log" | grep -E "^\[(base_lm|base_vision|clip|pretrain|sft|rl)\] done|^error" || true
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then echo "stage $name failed (exit $rc), see $log" >&2; exit "$rc"; fi
  echo "{\"stage\": \"$name\", \"seconds\": $((SECONDS - t0))}" >> "$(dirname "$log")/times.jsonl"
}

evaluation() {  # evaluation OUTPUT LOGFILE ARGS...: $PYTHON ARGS > LOGFILE, timed as "evaluate/<log name>" (the
  # report sums them); skipped when OUTPUT is newer than the model beside it (done by an earlier, resumed run)
  local out=$1 log=$2 t0=$SECONDS; shift 2
  if [ -f "$out" ] && [ "$out" -nt "$(dirname "$out")/model.safetensors" ]; then return 0; fi
  $PYTHON "$@" > "$log" 2>&1 || { local rc=$?; echo "evaluation failed (exit $rc), see $log" >&2; exit "$rc"; }
  echo "{\"stage\": \"evaluate/$(basename "$log" .log)\", \"seconds\": $((SECONDS - t0))}" >> "$(dirname "$log")/times.jsonl"
}

# ---------------------------------------------------------------- data
# (re)generated when missing or written by another SynthPath version than this checkout's generator: an old
# world's pixels differ (1.0 drew the mitotic figures too small to count), and nothing else would say so
why=$($PYTHON -c "import sys; from data.synthpath.prepare import stale; print(stale(sys.argv[1]))" "$DATA")
if [ -n "$why" ]; then
  echo "[data] $why: generating SynthPath"
  t0=$SECONDS
  $PYTHON data/synthpath/prepare.py --out "$DATA" --seed 0
  echo "[data] SynthPath ready in $((SECONDS - t0))s -> $DATA"
fi

# ---------------------------------------------------------------- stage 0: the base LM, shared by every seed
# (at real scale a released LM plays this part: train_pretrain.py --lm_init <its directory>)
# At the toy budget whether the base LM learns to check an option against the finding depends on the seed (README,
# "What the toy run shows"); without that check SFT's MCQ sits near chance. --base_tries K (default 3) retrains it
# with the next seed while the held-out reading probe's whole walks (every check of a walk right) are below 0.8, and
# keeps each miss as base_lm.seed<k>/. Three, because seeds 0 and 1 missed and seed 2 passed on the machine of
# sessions 19 to 21. The gate was the check's top-1 (>= 0.8) until session 29: a base at check 0.827 had whole walks
# at 0.555 and its SFT walked the tumour options by position.
base_lm_try() {  # base_lm_try SEED: both phases of stage 0 at SEED, then the probe; status 3 when the walk is < 0.8
  stage base_lm "$OUT/base_lm.log" $PYTHON -m nanopatho.base_lm --preset "$PRESET" --data "$DATA" --seed "$1" \
    --out_dir "$OUT/base_lm"
  # second phase: the option walk on options that share a word ("mild pleomorphism", "marked pleomorphism");
  # 1,800 steps (600 until session 29: base seed 0's probe walk 0.555 -> 0.855, near-miss walk 0.41 -> 0.665)
  stage base_lm_near "$OUT/base_lm_near.log" $PYTHON -m nanopatho.base_lm --preset "$PRESET" --data "$DATA" \
    --seed "$1" --init "$OUT/base_lm" --train_file reading_near.jsonl --level_steps 200 --max_steps 1800 \
    --out_dir "$OUT/base_lm_near"
  $PYTHON -m nanopatho.diagnose --ckpt "$OUT/base_lm" --data "$DATA" --probe reading_probe.jsonl \
    --out "$OUT/base_lm/diagnose.json" > "$OUT/diagnose_base_lm.log" 2>&1 || return
  $PYTHON -m nanopatho.diagnose --ckpt "$OUT/base_lm_near" --data "$DATA" --probe reading_probe.jsonl \
    --require walk=0.8 --out "$OUT/base_lm_near/diagnose.json" > "$OUT/diagnose_base_lm_near.log" 2>&1
}
for ((try = 0; try < BASE_TRIES; try++)); do
  BS=$((BASE_SEED + try))
  if [ -d "$OUT/base_lm.seed$BS" ]; then continue; fi  # a miss of an earlier, interrupted speedrun
  t_try=$SECONDS rc=0; base_lm_try "$BS" || rc=$?
  if [ "$rc" = 0 ]; then break; fi
  if [ "$rc" != 3 ]; then echo "stage 0's probe failed (exit $rc), see $OUT/diagnose_base_lm_near.log" >&2; exit "$rc"; fi
  echo "[base_lm] seed $BS did not learn to check: $(tail -n 1 "$OUT/diagnose_base_lm_near.log")"
  if [ $((try + 1)) -lt "$BASE_TRIES" ]; then  # the miss's time stays in the report's shared time, under its own name
    echo "{\"stage\": \"base_lm.seed$BS\", \"seconds\": $((SECONDS - t_try))}" >> "$OUT/times.jsonl"
    mkdir "$OUT/base_lm.seed$BS" && mv "$OUT/base_lm" "$OUT/base_lm_near" "$OUT/base_lm.log" "$OUT/base_lm_near.log" \
      "$OUT/diagnose_base_lm.log" "$OUT/diagnose_base_lm_near.log" "$OUT/base_lm.seed$BS/"
  else
    echo "[base_lm] warning: going on with it; SFT's MCQ answers will sit near chance (rm -r $OUT/base_lm* and rerun" \
      "with more --base_tries, or another --base_seed)" >&2
  fi
done

# ---------------------------------------------------------------- stage 0v: the base vision tower, shared by every seed
# (toy only: a ViT supervised on the world's attribute labels over freshly rendered tumour tiles; at real scale a
# released pathology tower plays this part: train_clip.py --vision_init <its directory>)
CLIP_INIT=()
RL_TYPES=()
if [ "$PRESET" = toy ]; then
  # RL on every tumour question type, now that the SFT model reads each above chance, plus a share of tissue
  # questions: RL on some types wore down the others (grade, mitoses), and 120 steps keep RL's time near
  # what it was (issue-15 notes, session 17). --eval_every 0: no held-out MCQ every 20 steps (one at the end),
  # since every checkpoint is evaluated in full below; it only logged, the training is the same.
  # --ptx_file: PPO-ptx also on a tissue MCQ per train tumour in its short chain (SynthPath 1.5): without them
  # RL gave the tissue questions on tumour tiles the tumour questions' long form and the walk then checked the
  # options against the last finding listed. --ptx_batch 5 (preset 4) keeps about 4 of SFT's own rows per update:
  # at 4 the walk of the other types wore down. Dev world, GRPO seed 0, step 120, plain -> these: from the
  # seed-2-base SFT tissue 0.937 -> 0.988, MCQ 0.804 -> 0.818; from the seed-0-base SFT (little drift) tissue
  # 0.953 -> 0.961, MCQ 0.796 -> 0.787 (issue-15 notes, sessions 30-31)
  RL_TYPES=(--types glands,pleomorphism,mitoses,grade,tissue:165 --max_steps 120 --eval_every 0
            --ptx_file sft_train.jsonl,sft_tissue_tumour.jsonl --ptx_batch 5)
  stage base_vision "$OUT/base_vision.log" $PYTHON -m data.synthpath.perception --n_train 4000 --steps 1500 \
    --out_dir "$OUT/base_vision"
  CLIP_INIT=(--vision_init "$OUT/base_vision")
fi

# ---------------------------------------------------------------- stages, per seed
for SEED in ${SEEDS//,/ }; do
  O="$OUT/seed$SEED"
  mkdir -p "$O"
  common=(--preset "$PRESET" --data "$DATA" --seed "$SEED")
  stage clip "$O/clip.log" $PYTHON train_clip.py "${common[@]}" "${CLIP_INIT[@]}" --out_dir "$O/clip"
  stage pretrain "$O/pretrain.log" $PYTHON train_pretrain.py "${common[@]}" --vision_init "$O/clip" \
    --lm_init "$OUT/base_lm_near" --train_file captions_train.jsonl,captions_findings.jsonl --pooled_token \
    --reading_file reading_train.jsonl,reading_near.jsonl --out_dir "$O/pretrain"
  stage sft "$O/sft.log" $PYTHON train_sft.py "${common[@]}" --init "$O/pretrain" --train_file sft_train.jsonl,sft_tumour.jsonl \
    --reading_file reading_train.jsonl,reading_near.jsonl --out_dir "$O/sft"
  stage rl_grpo "$O/rl_grpo.log" $PYTHON train_rl.py "${common[@]}" --algo grpo --init "$O/sft" "${RL_TYPES[@]}" \
    --out_dir "$O/rl_grpo"
  stage rl_dapo "$O/rl_dapo.log" $PYTHON train_rl.py "${common[@]}" --algo dapo --init "$O/sft" "${RL_TYPES[@]}" \
    --out_dir "$O/rl_dapo"
  # a resume neither redoes nor recounts an evaluation already done, and evaluates a model trained again
  for CK in pretrain sft rl_grpo rl_dapo; do
    evaluation "$O/$CK/eval.json" "$O/eval_$CK.log" -m nanopatho.evaluate --ckpt "$O/$CK" --data "$DATA" \
      --tasks mcq,vqa --max_new_tokens 256 --responses
    echo "[eval] $CK: $(grep -E '^mcq +accuracy +[0-9]' "$O/eval_$CK.log" | tr -s ' ')"
  done
  # where the loss sits: option letters vs the rest of the reply (SFT held-out rows), and the reading probe
  for CK in pretrain sft; do
    evaluation "$O/$CK/diagnose.json" "$O/diagnose_$CK.log" -m nanopatho.diagnose --ckpt "$O/$CK" --data "$DATA" \
      --probe reading_probe.jsonl --out "$O/$CK/diagnose.json"
  done
  # what the towers' features hold about the tumour attributes (linear heads on frozen features, fresh tiles),
  # and what the stage-1 LM says about the same tiles after "Tumour findings: <finding> is"
  if [ "$PRESET" = toy ]; then
    for CK in clip sft; do
      evaluation "$O/$CK/perception.json" "$O/perception_$CK.log" -m data.synthpath.perception --init "$O/$CK" \
        --frozen --out "$O/$CK/perception.json"
    done
    evaluation "$O/pretrain/readout.json" "$O/readout_pretrain.log" -m data.synthpath.readout --ckpt "$O/pretrain" \
      --out "$O/pretrain/readout.json"
    # where each MCQ point went: the finding the reply stated before its walk (sight) or the walk (reading),
    # from the replies the evaluation above kept (no model run; an eval.json from before --responses keeps none)
    for CK in sft rl_grpo rl_dapo; do
      if ! grep -q '"responses"' "$O/$CK/eval.json"; then echo "[sight] $CK: eval.json keeps no replies, skipped"; continue; fi
      evaluation "$O/$CK/sight.json" "$O/sight_$CK.log" -m data.synthpath.sight --eval "$O/$CK/eval.json" \
        --data "$DATA" --out "$O/$CK/sight.json"
    done
  fi
done

# ---------------------------------------------------------------- report
$PYTHON -m nanopatho.report --out "$OUT" --data "$DATA" --seeds "$SEEDS" --preset "$PRESET" "${README_FLAG[@]}" > "$OUT/report.log"
echo "report: $OUT/report.md"
