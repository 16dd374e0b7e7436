#!/usr/bin/env bash
# Full-scale run on one H200 (issue 18): the default calibration of infinity-2b / infinity-8b from
# random-weight files in the official formats, generation with the exported policy, and the
# batching benchmark.
#
#   OUT=/somewhere benchmarks/fullscale.sh STAGE [STAGE ...]        (run from the repository root)
#
# Stages, each idempotent (a finished one only reports again) and each writing its results to $OUT:
#   synth2b, synth8b      random weights in the official layout -> $WORK/w2b, $WORK/w8b (~1-3 min each;
#                         skipped when the files are there; the calib/generate stages run them when needed)
#   batching              python -m benchmarks.batch: 2B at batch $BATCHES2B, 8B at $BATCHES8B (random weights, no files)
#   calib2b, calib8b      python -m calibrate backbone=infinity-2b|8b backbone.weights.*=<files> tracking=local;
#                         stopped with SIGINT before DEADLINE_S (trials so far are kept) and resumed by the
#                         next call of the same stage (the Optuna study lives in $WORK/calib-<backbone>)
#   generate2b, generate8b  python -m toprovar generate backbone=... policy=<exported> (4 prompts)
#   gputests              the CUDA-only tests of this work (padded text reuses the graphs, bounded unit cache,
#                         planned units replay the eager bits): seconds, on the test-small backbone
#   clip                  a random CLIP of ViT-L/14 shapes -> $WORK/clip; with CLIP=1 the calib stages add
#                         quality.clip=$WORK/clip (CLIPScore constraint + acceptance; a cost measurement only)
# Files back: each calib stage 5 (a tar of the tables and logs, pareto, two grids, early exits), generate 2,
# batching 4, synth 0: keep a call's stages within 8 files (e.g. "synth2b batching", "calib2b",
# "generate2b synth8b", "calib8b").
# Environment: OUT (required), WORK=/tmp/fullscale, N2B=40 and N8B=16 (trials), PROMPTS8B (overrides for
# 8B's prompt counts, default "prompts.presample=8 prompts.search=8 prompts.validate=8"), EXTRA2B / EXTRA8B
# (more calibrate overrides), DEADLINE_S=560 (this call's seconds: a calibration still running 30 s before
# is stopped with SIGINT, a stage that cannot start in time is skipped), BATCHES2B=1,2,4,8, BATCHES8B=1,2,4, CLIP=0.
# SMALL=1: the same stages on CPU with the small test backbones read from files of the same layout
# (synth preset=small, backbones test-small-t5 / test-small-patchify-t5, bench --smoke): a dry run of this script.
# Random weights make every quality figure meaningless: these runs measure mechanics, cost and scale.
set -uo pipefail

export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
if ! python3 -c "import optuna, hydra, omegaconf, mlflow" 2>/dev/null; then  # the H200 image has none of them
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
: "${OUT:?set OUT to the folder whose files come back}"
WORK=${WORK:-/tmp/fullscale}
N2B=${N2B:-40}
N8B=${N8B:-16}
PROMPTS8B=${PROMPTS8B:-prompts.presample=8 prompts.search=8 prompts.validate=8}
EXTRA2B=${EXTRA2B:-}
EXTRA8B=${EXTRA8B:-}
DEADLINE_S=${DEADLINE_S:-560}  # the device stops a command at 600 s
BATCHES2B=${BATCHES2B:-1,2,4,8}
BATCHES8B=${BATCHES8B:-1,2,4}
CLIP=${CLIP:-0}
SMALL=${SMALL:-0}
# The small backbones are registered from the checkout (tests/backbones.py, on PYTHONPATH above).
if [ "$SMALL" = 1 ]; then WORK=${WORK}-small; export TOPROVAR_EXTRA_BACKBONES=tests.backbones; fi
mkdir -p "$OUT" "$WORK"

say() { echo "== fullscale $(date +%T) $*"; }
left() { echo $((DEADLINE_S - SECONDS)); }  # seconds left in this call

preflight() {
  python3 - <<'EOF' || exit 1
import importlib, sys
missing = [m for m in ("optuna", "hydra", "omegaconf", "mlflow", "torchmetrics", "pandas", "pyarrow", "matplotlib",
                       "scipy", "transformers", "tokenizers", "toprovar", "calibrate") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"fullscale: missing Python packages {missing}: carry .whl and run from the repository root")
import torch
print("fullscale:", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
EOF
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
  df -h "$WORK" | tail -1
}

# -- weights ------------------------------------------------------------------------------------------
weights_2b() {
  local name=infinity-2b
  [ "$SMALL" = 1 ] && name=test-small-t5
  echo "backbone=$name backbone.weights.transformer=$WORK/w2b/infinity_2b_reg.pth" \
       "backbone.weights.vae=$WORK/w2b/infinity_vae_d32_reg.pth backbone.weights.text_encoder=$WORK/w2b/flan-t5-xl"
}
weights_8b() {
  local name=infinity-8b
  [ "$SMALL" = 1 ] && name=test-small-patchify-t5
  echo "backbone=$name backbone.weights.transformer=$WORK/w8b/infinity_8b_weights" \
       "backbone.weights.vae=$WORK/w8b/infinity_vae_d56_f8_14_patchify.pth" \
       "backbone.weights.text_encoder=$WORK/w8b/flan-t5-xl"
}
synth() {  # synth 2b|8b
  local tag=$1 dir=$WORK/w$1 first
  first=$(weights_"$tag" | tr ' ' '\n' | sed -n 's/^backbone.weights.[a-z_]*=//p')
  local have=1
  for path in $first; do [ -e "$path" ] || have=0; done
  if [ $have = 1 ]; then say "synth$tag: files present in $dir"; return 0; fi
  say "synth$tag: writing random weights to $dir"
  local start=$SECONDS
  python3 -m toprovar.checkpoints synth "backbone=infinity-$tag" "out=$dir" "preset=$([ "$SMALL" = 1 ] && echo small || echo full)" 2>&1 | grep -v "it/s\]" | tail -3 || return 1
  say "synth$tag: done in $((SECONDS - start)) s"; du -sh "$dir"
}

# -- calibration --------------------------------------------------------------------------------------
summary() {  # summary RUN_DIR: the stage table of timings.json and the policy's measured speedup
  python3 - "$1" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for path in sorted(run.glob("timings*.json")):
    t = json.loads(path.read_text())
    print(f"{path.name}: {t['backbone']} on {t['device_name']}, batch {t['batch_size']}, objective {t['objective']}, "
          f"peak allocated {t['peak_allocated_gib']} GiB, reserved {t['peak_reserved_gib']} GiB")
    print(f"{'stage':10} {'wall_s':>8} {'gen_s':>8} {'gen%':>6} {'images':>6} {'img/s gen':>9} {'quality_s':>9} "
          f"{'pictures_s':>10} {'tracking_s':>10} {'other_s':>8} {'peak_GiB':>8}")
    for name, r in t["stages"].items():
        print(f"{name:10} {r['wall_s']:8.1f} {r['generation_s']:8.1f} {100 * (r['generation_share'] or 0):6.1f} "
              f"{r['images']:6d} {str(r['images_per_s_generating']):>9} {r['quality_s']:9.1f} {r['pictures_s']:10.1f} "
              f"{r['tracking_s']:10.1f} {r['other_s']:8.1f} {str(r.get('peak_allocated_gib')):>8}")
policy = run / "policy.yaml"
if policy.exists():
    import yaml
    p = yaml.safe_load(policy.read_text())["provenance"]
    v, s = p["measured"]["validation"], p["measured"]["search"]
    print(f"policy: trial {p['search']['selected_trial']}, search speedup {s.get('speedup'):.3f} "
          f"(latency {s.get('latency_ms')} ms vs {s.get('latency_unpruned_ms')} ms), held-out speedup "
          f"{v.get('speedup'):.3f}, FLOP speedup {v.get('flop_speedup'):.3f}, SSIM {v.get('ssim'):.3f}; "
          f"acceptance {p['acceptance']['decision']} ({p['search']['trials_complete']} trials)")
EOF
}

calib() {  # calib 2b|8b
  local tag=$1 dir=$WORK/calib-infinity-$1 trials overrides
  synth "$tag" || return 1
  if [ "$tag" = 2b ]; then trials=$N2B; overrides="$EXTRA2B"; else trials=$N8B; overrides="$PROMPTS8B $EXTRA8B"; fi
  [ "$CLIP" = 1 ] && { clip_model || return 1; overrides="$overrides quality.clip=$WORK/clip"; }
  if [ -f "$dir/policy.yaml" ]; then
    say "calib$tag: done before ($dir/policy.yaml)"
  else
    local stages=""
    if [ -f "$dir/presample/presample_summary.json" ]; then  # an interrupted run: resume its study
      stages="stages=[search,select,export]"
      [ -f "$dir/timings.json" ] && mv "$dir/timings.json" "$dir/timings-part$(ls "$dir"/timings*.json | wc -l).json"
      say "calib$tag: resuming the study in $dir"
    fi
    say "calib$tag: python -m calibrate $(weights_"$tag") search.n_trials=$trials $overrides $stages"
    local start=$SECONDS budget=$(( $(left) - 30 ))  # 30 s for its MLflow logging and timings after SIGINT
    [ "$budget" -gt 60 ] || { say "calib$tag: only $(left) s left in this call; run the stage again"; return 1; }
    # shellcheck disable=SC2046
    timeout -s INT -k 20 "$budget" python3 -m calibrate $(weights_"$tag") "search.n_trials=$trials" \
      tracking=local "hydra.run.dir=$dir" $overrides $stages 2>&1 | tee -a "$dir.stdout.log" \
      | grep -v "UserWarning\|return func"
    local status=${PIPESTATUS[0]}
    say "calib$tag: exit $status after $((SECONDS - start)) s"
    [ "$status" = 124 ] || [ "$status" = 130 ] && say "calib$tag: stopped after $budget s; call the stage again to resume"
  fi
  summary "$dir"
  cp "$dir.stdout.log" "$dir/stdout.log" 2>/dev/null
  (cd "$dir" && tar czf "$OUT/calib$tag.tar.gz" --ignore-failed-read timings*.json policy.yaml calibrate.log stdout.log \
      .hydra/overrides.yaml search/trials.csv search/pareto_front.json validation/per_prompt.csv \
      presample/presample_summary.json presample/presample_scales.csv 2>/dev/null)
  for pair in search/pareto.png:pareto grids/search_unpruned_vs_policy.png:grid-search \
              grids/validate_unpruned_vs_policy.png:grid-validate presample/early_exits.png:early-exits; do
    [ -f "$dir/${pair%%:*}" ] && cp "$dir/${pair%%:*}" "$OUT/calib$tag-${pair##*:}.png"
  done
}

generate() {  # generate 2b|8b
  local tag=$1 dir=$WORK/calib-infinity-$1 out=$WORK/generate-$1 batch=4
  [ "$tag" = 8b ] && batch=2
  synth "$tag" || return 1
  [ -f "$dir/policy.yaml" ] || { say "generate$tag: no exported policy yet; run calib$tag first"; return 1; }
  [ "$(left)" -gt 90 ] || { say "generate$tag: only $(left) s left in this call; run it again"; return 1; }
  say "generate$tag: python -m toprovar generate ... policy=$dir/policy.yaml"
  local start=$SECONDS
  # shellcheck disable=SC2046
  python3 -m toprovar generate $(weights_"$tag") "policy=$dir/policy.yaml" "out_dir=$out" "batch_size=$batch" \
    'prompts=["a red fox sitting in fresh snow, morning light", "an old lighthouse on a rocky coast during a storm", "a bowl of ramen with a soft boiled egg, top view", "a cat wearing a tiny wizard hat, studio photo"]' \
    2>&1 | tee "$out.log" | grep -v "it/s\]"
  say "generate$tag: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s (weights loading included)"
  python3 - "$out/trace.csv" <<'EOF'
import sys
import pandas as pd
t = pd.read_csv(sys.argv[1])
calls = t.groupby("batch")[["text_encode_ms", "decode_ms", "total_ms"]].first()
print("per call (ms):", calls.round(1).to_dict("records"))
EOF
  cp "$out.log" "$out/generate.log"
  (cd "$out" && tar czf "$OUT/generate$tag.tar.gz" trace.csv prompts.txt generate.log)
  cp "$out/000_seed0.png" "$OUT/generate$tag-000.png" 2>/dev/null
}

batching() {
  [ "$(left)" -gt 200 ] || { say "batching: only $(left) s left in this call; run it in a call of its own"; return 1; }
  say "batching: infinity-2b at batch $BATCHES2B"
  local smoke=""
  [ "$SMALL" = 1 ] && smoke=--smoke
  python3 -m benchmarks.batch --backbone infinity-2b --batches "$BATCHES2B" --json-out "$OUT/batching-2b.json" \
    --md-out "$OUT/batching-2b.md" $smoke
  say "batching: infinity-8b at batch $BATCHES8B"
  python3 -m benchmarks.batch --backbone infinity-8b --batches "$BATCHES8B" --json-out "$OUT/batching-8b.json" \
    --md-out "$OUT/batching-8b.md" $smoke
}

clip_model() {
  [ -f "$WORK/clip/model.safetensors" ] && return 0
  say "clip: a random CLIP of ViT-L/14 shapes -> $WORK/clip"
  python3 benchmarks/random_clip.py "$WORK/clip" --preset "$([ "$SMALL" = 1 ] && echo test || echo vit-l-14)"
}

preflight
[ $# -gt 0 ] || { echo "usage: OUT=... benchmarks/fullscale.sh synth2b|synth8b|batching|calib2b|calib8b|generate2b|generate8b|gputests|clip ..."; exit 2; }
for stage in "$@"; do
  case $stage in
    synth2b) synth 2b ;;
    synth8b) synth 8b ;;
    calib2b) calib 2b ;;
    calib8b) calib 8b ;;
    generate2b) generate 2b ;;
    generate8b) generate 8b ;;
    batching) batching ;;
    clip) clip_model ;;
    gputests) python3 -m pytest -q -p no:cacheprovider tests/test_calibrate_fullscale.py tests/test_fused_block.py \
                -k "cuda or evicted" ;;
    *) echo "fullscale: unknown stage $stage"; exit 2 ;;
  esac || say "$stage failed"
done
ls -la "$OUT"
