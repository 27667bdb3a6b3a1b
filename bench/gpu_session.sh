#!/usr/bin/env bash
# Every GPU measurement this project reports, in one run (GPU time is scarce: one prepared script, one go).
#
#   DATA=/path/with/cifar-10-batches-py OUT=gpu-out bash bench/gpu_session.sh
#
# Phases, each under its own time limit inside BUDGET seconds. Timed phases run alone on the GPU; the others share it.
#   0 smoke    the DALI GPU loader runs and matches albumentations (abort everything if not: no time to waste)
#   1 bench    python -m bench (loaders alone, model step alone, epochs; bs 128/512/2048), then dwres's step rate
#   2 search   the fast recipe's peak lr on a 5,000-image validation split (3 runs side by side; accuracy only)
#   3 final    the fast recipe, 3 seeds, one at a time (these are the timed runs), then torchrun 1 rank vs plain
#   4 accuracy side by side: seed net 40 epochs bs 128 with each loader, the seed recipe (60 epochs, DALI), the
#              ablations of the fast recipe on the validation split, and the parity + loader tests against the
#              real GPU graph (pytest -k dali-gpu). Accuracy only: they share the GPU.
# QUICK=1 shrinks everything to a CPU-sized smoke run (what CI-less machines use to try this script).
# Needs torch, DALI, albumentations 2.0.x and opencv. albumentations 2.0.8 needs albucore 0.0.24: a newer albucore
# (0.3.x imports `numkong`) breaks its import; `pip install albucore==0.0.24` over it if so.
set -u
OUT=${OUT:-gpu-out}
DATA=${DATA:-$HOME/data/cifar10}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT/runs" "$OUT/logs"
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[+$((SECONDS - START))s] $*" | tee -a "$OUT/logs/timeline.txt"; }
phase() {  # phase NAME SECONDS command...: run with a limit that never exceeds what is left
  local name=$1 limit=$2; shift 2
  local cap=$(( $(left) - 15 ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then say "skip $name: no time left"; return 1; fi
  say "start $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/logs/$name.txt" 2>&1
  local rc=$?
  # side-by-side phases start background runs; a phase cut off by its limit must not leave them running
  pkill -TERM -f -- "-m train" 2>/dev/null; pkill -TERM -f -- "-m pytest -q -p no:cacheprovider" 2>/dev/null
  say "end $name rc=$rc"
  return $rc
}

if [ "$QUICK" = 1 ]; then
  SMALL=(--allow-small-data --limit-train 512) EPOCHS_SEED40=1 EPOCHS_SEED60=1 FAST_EPOCHS=1 VAL=256
  BENCH=(--quick) DEVICE=cpu SEARCH_LRS="0.2 0.4"
else
  SMALL=() EPOCHS_SEED40=40 EPOCHS_SEED60=60 FAST_EPOCHS=20 VAL=5000
  BENCH=() DEVICE=cuda SEARCH_LRS="0.2 0.4 0.8"
fi
# (paths must not contain spaces: COMMON is split on them in the side-by-side phases)
COMMON="--data-dir $DATA --device $DEVICE --no-progress --overwrite ${SMALL[*]}"
export PY OUT VAL EPOCHS_SEED40 EPOCHS_SEED60 SEARCH_LRS COMMON
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1 || true

# 0: smoke --------------------------------------------------------------------------------------------------------
phase smoke 120 "$PY" - "$DEVICE" <<'PY' || { say "smoke failed: stopping"; exit 3; }
import sys, time, numpy as np, torch
from pipeline import make_loader
from pipeline.albu_loader import apply_fixed
from pipeline.params import AugParams
from pipeline.spec import AugSpec
device = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
loader = make_loader("dali", x, rng.integers(0, 10, 4096), 512, device=device)
t = time.perf_counter(); n = sum(len(b) for b, _ in loader); torch.cuda.synchronize() if device == "cuda" else None
print(f"epoch of {n} images in {time.perf_counter() - t:.3f}s on {device}")
rows = [{"ssr": True, "angle": 4.0, "scale": 1.03, "shift_x": 1.0, "flip": True, "cutout": True, "hole_y": 3,
         "hole_x": 5, "hole_h": 6, "hole_w": 7}, {}]
out = loader.run_fixed(x[:2], AugParams.fixed(rows, device=loader.device)).cpu().permute(0, 2, 3, 1).numpy()
ref = np.stack([apply_fixed(AugSpec(), x[i], r) for i, r in enumerate(rows)])
diff = np.abs(out - ref)[:, 2:-2, 2:-2] * 255 / 2
print("max interior diff (uint8 levels):", diff.max(), "mean:", diff.mean())
assert diff.max() <= 2.5, "DALI GPU disagrees with albumentations"
PY

# 1: bench --------------------------------------------------------------------------------------------------------
phase host-ops 30 "$PY" -m bench.host_ops --batch-size 512
phase bench 170 "$PY" -m bench "${BENCH[@]}" --out "$OUT/bench"
phase bench-dwres 40 "$PY" -m bench --what model --model dwres --batch-sizes 512 --repeats 3 --out "$OUT/bench-dwres" \
  "${BENCH[@]}" --batch-sizes 512
# Epochs of the fast recipe: as many as fit in 13.5 s at dwres's measured step rate (8% left for the loader),
# capped at 20. Measured on synthetic data, chosen before any accuracy is seen.
FAST_EPOCHS=$("$PY" - "$OUT/bench-dwres" "$FAST_EPOCHS" <<'PY'
import glob, json, sys
cap = int(sys.argv[2])
try:
    rate = json.load(open(glob.glob(sys.argv[1] + "/*.json")[0]))["results"][0]["img_per_s"]
    print(max(1, min(cap, int(13.5 / (50_000 / (0.92 * rate))))))
except Exception:
    print(cap)
PY
)
say "fast recipe epochs: $FAST_EPOCHS"

# 2: lr search on the validation split ----------------------------------------------------------------------------
export FAST_EPOCHS
search() {
  for lr in $SEARCH_LRS; do
    $PY -m train --recipe fast --epochs "$FAST_EPOCHS" --lr "$lr" --val-split "$VAL" $COMMON \
      --out "$OUT/runs/search-lr$lr" > "$OUT/logs/search-lr$lr.txt" 2>&1 &
  done
  wait
}
export -f search
phase search 100 bash -c search
BEST_LR=$("$PY" - "$OUT/runs" <<'PY'
import glob, json, sys
runs = [(json.load(open(p))["epochs"][-1]["val_acc"], p) for p in glob.glob(sys.argv[1] + "/search-lr*/metrics.json")]
best = max(runs)[1] if runs else "lr0.4/"
print(best.split("search-lr")[1].split("/")[0])
PY
)
say "best lr on the validation split: $BEST_LR"

# 3: the fast recipe, timed, 3 seeds; then torchrun 1 rank vs the same run without it ------------------------------
for seed in 0 1 2; do
  phase "fast-seed$seed" 50 "$PY" -m train --recipe fast --epochs "$FAST_EPOCHS" --lr "$BEST_LR" --seed "$seed" \
    $COMMON --out "$OUT/runs/fast-seed$seed"
done
# the same recipe compiled with CUDA graphs (compile time reported apart, as compile_seconds): is launch overhead
# what stands between the recipe and 15 s?
phase fast-compiled 150 "$PY" -m train --recipe fast --epochs "$FAST_EPOCHS" --lr "$BEST_LR" --compile \
  --compile-mode reduce-overhead $COMMON --out "$OUT/runs/fast-compiled"
TORCHRUN_EPOCHS=$([ "$QUICK" = 1 ] && echo 1 || echo 5)
phase plain-5ep 35 "$PY" -m train --recipe fast --epochs "$TORCHRUN_EPOCHS" --lr "$BEST_LR" $COMMON \
  --out "$OUT/runs/plain-5ep"
[ "$QUICK" = 1 ] || phase torchrun-5ep 45 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m train \
  --recipe fast --epochs "$TORCHRUN_EPOCHS" --lr "$BEST_LR" $COMMON --out "$OUT/runs/torchrun-5ep"

# 4: accuracy runs (and the GPU tests) side by side ---------------------------------------------------------------
export BEST_LR
accuracy() {
  run() { local name=$1; shift; $PY -m train "$@" $COMMON --out "$OUT/runs/$name" > "$OUT/logs/$name.txt" 2>&1 & }
  run seed40-dali --recipe seed --loader dali --epochs "$EPOCHS_SEED40"
  run seed40-cpu --recipe seed --loader cpu --epochs "$EPOCHS_SEED40" --workers 8
  run seed-recipe --recipe seed --loader dali --epochs "$EPOCHS_SEED60"
  local base=(--recipe fast --epochs "$FAST_EPOCHS" --lr "$BEST_LR" --val-split "$VAL")
  run ablate-no-tta "${base[@]}" --tta none
  run ablate-no-smoothing "${base[@]}" --label-smoothing 0
  run ablate-no-aug "${base[@]}" --aug flip_p=0 --aug ssr_p=0 --aug cutout_p=0
  run ablate-seed-net "${base[@]}" --model seed
  if [ "$QUICK" != 1 ]; then
    $PY -m pytest -q -p no:cacheprovider -k "dali-gpu or dali_gpu" tests/test_parity.py tests/test_loaders.py \
      > "$OUT/logs/tests.txt" 2>&1 &
  fi
  wait
}
export QUICK
export -f accuracy
phase accuracy 400 bash -c accuracy

# pack: metrics, bench reports and small plots in one archive (the device returns few files) -----------------------
say "packing"
tar -czf "$OUT/results.tgz" -C "$OUT" --exclude='*.pt' --exclude='*.npz' --exclude='misclassified.png' runs bench \
  bench-dwres logs 2>/dev/null
"$PY" - "$OUT" > "$OUT/summary.txt" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(sys.argv[1] + "/runs/*/metrics.json")):
    m = json.load(open(path)); e = m["epochs"][-1]; key = "val" if "val_acc" in e else "test"
    print(f"{os.path.basename(os.path.dirname(path)):22s} epochs {len(m['epochs']):3d}/{m['config']['epochs']:3d} "
          f"{key} {e[key + '_acc']:.4f} train_s {m['train_seconds']:7.2f} last-epoch {e['seconds']:.2f}s")
PY
cat "$OUT/summary.txt"
say "done"
