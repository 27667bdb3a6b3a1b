#!/usr/bin/env bash
# Every GPU figure this project reports, in ONE device command: the GPU comes for 15 minutes, one command at most
# 10 minutes, and a command returns at most 8 files two folders deep from $OUT, also when it is killed at its limit.
#
# The recipe (../shared/gpu/README.md), in order, with the time each costs:
#   1. here, no GPU time (~2-3 min the first time, then cached):   bash ../shared/gpu/pack.sh
#   2. device calls, back to back (machine start ~1-2 min + kit ~2 min):   bash .gpu/cK/step.sh   for K = 0 .. N-1
#   3. one device call, its time limit a little above BUDGET (BUDGET = GPU time left - ~60 s for the return, <= 570):
#        export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; DATA=/tmp/data BUDGET=540 bash bench/gpu_session.sh
#
# PLAN=1 prints the phases with their limits and `total N s`, running nothing. QUICK=1 runs every phase on this CPU
# at toy sizes (how the script is tried without a GPU). PHASES="smoke train" runs those phases alone.
# Phases run most-needed first; each gets its limit or what is left of BUDGET, whichever is less. A failed phase
# prints the end of its log and the next one starts.
# After every phase $OUT holds three files, each replaced whole: timeline.txt, summary.txt (every figure so far) and
# results.tgz (every JSON, log and metrics.json so far), so a command killed at any second returns all that finished.
set -u
OUT=${OUT:-gpu-out}
DATA=${DATA:-$HOME/data/cifar10}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}  # everything a phase writes; only the packed copy goes to $OUT
RESERVE=10                  # seconds kept for the packing after the last phase
# name:limit in seconds, most-needed first; search, last, takes what BUDGET leaves
LIMITS=(smoke:45 train:60 gpu-tests:75 epochs:80 fast-seeds:90 loaders:60 host-ops:20 seed-recipe:80 search:0)
ALL=" ${LIMITS[*]%%:*} "
PHASES=" ${PHASES:-${ALL:1}} "
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET > 570 || BUDGET < 60)); then
  echo "error: BUDGET=$BUDGET: give whole seconds from 60 to 570 (a device command runs at most 600 s)" >&2
  exit 2
fi
for p in $PHASES; do
  [[ $ALL == *" $p "* ]] || { echo "error: PHASES: no phase '$p'; the phases are:$ALL" >&2; exit 2; }
done

if [ "$QUICK" = 1 ]; then  # toy sizes on the CPU
  DEVICE=cpu SMOKE_IMAGES=2048 SIZES="64" STEPS="eager" DALI=dali-cpu SEED_EPOCHS=1 LRS="0.8" VAL=64
  SMALL="--allow-small-data --limit-train 192 --epochs 1 --batch-size 64" BENCH="--quick" HOST="--images 1024 --batch-size 64"
  WORKERS="--workers 1"
else
  DEVICE=cuda SMOKE_IMAGES=20000 SIZES="128 512 2048" STEPS="graph" DALI=dali-gpu SEED_EPOCHS=10 LRS="0.4 0.8 1.6" VAL=5000
  SMALL="" BENCH="" HOST="--batch-size 512" WORKERS="--workers 16"
fi
COMMON="--data-dir $DATA --device $DEVICE"
export NO_ALBUMENTATIONS_UPDATE=1  # albumentations would look for a newer version over the network at import
export QUICK PY VAL DATA DEVICE SMOKE_IMAGES SIZES STEPS DALI SEED_EPOCHS LRS SMALL BENCH HOST WORKERS COMMON WORK

# --- the phases: each a function run under its limit, its output in $WORK/logs/NAME.txt ----------------------------
p_smoke() {  # the chunked DALI loader runs, and matches albumentations on explicit parameters
  "$PY" - <<'EOF'
import os, time, numpy as np, torch
from pipeline import make_loader
device, n = os.environ["DEVICE"], int(os.environ["SMOKE_IMAGES"])
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
loader = make_loader("dali", x, rng.integers(0, 10, n), 512, device=device)
for epoch in range(2):  # the second epoch is warm
    t = time.perf_counter(); seen = sum(len(b) for b, _ in loader)
    torch.cuda.synchronize() if device == "cuda" else None
    print(f"smoke: epoch {epoch}: {seen} images in {time.perf_counter() - t:.3f} s on {device}")
EOF
  # the GPU graph against albumentations on explicit parameters: the parity test's own rows and tolerances
  local variant=dali-gpu; [ "$DEVICE" = cpu ] && variant=dali-batched-cpu
  "$PY" -m pytest -q -p no:cacheprovider "tests/test_parity.py::test_explicit_parameters_match_albumentations" -k "$variant" &&
    echo "smoke: passed (DALI $variant matches albumentations on explicit parameters)"
}
p_train() {  # the real command with the graph step: stopped by SIGINT after its first checkpoint, then --resume auto
  local flags="--recipe fast --epochs 3 --limit-train 5000 $COMMON --out $WORK/runs/train-resume"
  [ -n "$SMALL" ] && flags="--recipe fast $COMMON $SMALL --epochs 2 --out $WORK/runs/train-resume"
  "$PY" -m train $flags --overwrite &
  local pid=$!
  while kill -0 $pid 2>/dev/null && [ ! -e "$WORK/runs/train-resume/last.pt" ]; do sleep 0.2; done
  kill -INT $pid 2>/dev/null
  wait $pid
  echo "train: stopped with rc $?; resuming"
  "$PY" -m train $flags --resume auto
}
p_gpu-tests() { "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/; }
p_epochs() {  # the headline ratios: an epoch fed by each loader against the model-only epoch
  "$PY" -m bench $BENCH --what epoch --loaders $DALI cpu --batch-sizes $SIZES --steps $STEPS --out "$WORK/bench-epochs"
}
p_fast-seeds() {  # the fast recipe as it stands, one run at a time (the timed runs)
  for seed in 0 1 2; do
    "$PY" -m train --recipe fast --seed $seed $COMMON $SMALL --overwrite --out "$WORK/runs/fast-seed$seed" || return
  done
}
p_loaders() {  # each loader alone with the peers; kornia where it imports (the summary says when it did not)
  local kornia=$("$PY" -c "import kornia" 2>/dev/null && echo kornia)
  "$PY" -m bench $BENCH --what loader --loaders $DALI cpu $kornia torch $WORKERS --batch-sizes $SIZES \
    --out "$WORK/bench-loaders"
}
p_host-ops() { "$PY" -m bench.host_ops $HOST; }
p_seed-recipe() {  # the seed recipe, CUDA graph then eager, a few epochs each
  for graph in auto off; do
    "$PY" -m train --recipe seed --cuda-graph $graph $COMMON $SMALL --overwrite --epochs $SEED_EPOCHS \
      --out "$WORK/runs/seed-graph-$graph" || return
  done
}
p_search() {  # the fast recipe's lr re-chosen on a validation split, 3 side by side (accuracy only: not timed)
  local pids=() rc=0
  for lr in $LRS; do
    "$PY" -m train --recipe fast --lr $lr --val-split $VAL $COMMON $SMALL --overwrite --out "$WORK/runs/search-lr$lr" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait $pid || rc=$?; done
  return $rc
}
export -f p_smoke p_train p_gpu-tests p_epochs p_fast-seeds p_loaders p_host-ops p_seed-recipe p_search

# --- the summary: every figure so far, and each target met or missed ----------------------------------------------
summary() {
  "$PY" - "$WORK" <<'EOF'
import glob, importlib.util, json, os, statistics, sys
work = sys.argv[1]
if os.environ["QUICK"] == "1":
    print("QUICK=1: toy sizes on the CPU, a smoke run of this script; no figure here is a measurement")
def log(name):
    path = f"{work}/logs/{name}.txt"
    return open(path, errors="replace").read().splitlines() if os.path.exists(path) else []
for line in log("smoke"):
    if line.startswith("smoke:"):
        print(line)
for line in log("gpu-tests")[-1:]:
    print(f"gpu-tests: {line}")
if not importlib.util.find_spec("kornia"):
    print("kornia: not importable here, not measured")
rows = [r for p in sorted(glob.glob(f"{work}/bench-*/*.json")) for r in json.load(open(p))["results"]]
for r in rows:
    print(f"{r['what']:6s} {r['loader']:10s} bs {r['batch_size']:5d} step {r['step'] or '-':5s} "
          f"workers {r['workers'] if r['workers'] is not None else '-':>3} {r['img_per_s']:12,.0f} img/s"
          + (f"  epoch {r['epoch_s']:.3f} s" if r["epoch_s"] else ""))
for line in log("host-ops"):
    print(f"host-ops: {line}")
runs = {}
for path in sorted(glob.glob(f"{work}/runs/*/metrics.json")):
    m, name = json.load(open(path)), os.path.basename(os.path.dirname(path))
    e = m["epochs"][-1] if m["epochs"] else {}
    split = "val" if "val_acc" in e else "test"
    runs[name] = (e.get(f"{split}_acc", float("nan")), m["train_seconds"], m.get("wall_seconds", float("nan")))
    print(f"run {name:18s} epochs {len(m['epochs']):3d}/{m['config']['epochs']:3d} lr {m['config']['lr']:<5} "
          f"{split} {runs[name][0]:.4f} train {runs[name][1]:7.2f} s wall {runs[name][2]:7.2f} s")
def rate(what, loader, bs, **kw):
    found = [r["img_per_s"] for r in rows if (r["what"], r["loader"], r["batch_size"]) == (what, loader, bs)
             and all(r.get(k) == v for k, v in kw.items())]
    return max(found) if found else None
def target(text, ok):
    print(f"target {'MET   ' if ok else 'MISSED'} {text}")
for bs in sorted({r["batch_size"] for r in rows}):
    alone, epoch = rate("epoch", "model-only", bs, step="graph"), rate("epoch", "dali-gpu", bs, step="graph")
    if alone and epoch:
        target(f"DALI-fed epoch <= 1.05x model-only at bs {bs}: {alone / epoch:.3f}x", alone / epoch <= 1.05)
    dali = rate("loader", "dali-gpu", bs)
    if dali and bs >= 512:
        target(f"DALI alone >= 1.5M img/s at bs {bs}: {dali:,.0f}", dali >= 1.5e6)
        for peer in ("kornia", "torch"):
            if rate("loader", peer, bs):
                target(f"DALI alone >= {peer} at bs {bs}: {dali / rate('loader', peer, bs):.2f}x", dali >= rate("loader", peer, bs))
        albu = rate("loader", "cpu", bs, workers=16)
        if albu:
            target(f"DALI alone >= 25x albumentations (16 workers) at bs {bs}: {dali / albu:.1f}x", dali >= 25 * albu)
fast = [runs[f"fast-seed{s}"] for s in range(3) if f"fast-seed{s}" in runs]
if len(fast) == 3:
    acc = statistics.mean(a for a, _, _ in fast)
    target(f"fast recipe mean test accuracy >= 85%: {acc:.2%}", acc >= 0.85)
    target(f"fast recipe train <= 8 s each: {', '.join(f'{t:.2f}' for _, t, _ in fast)} s", all(t <= 8 for _, t, _ in fast))
    target(f"fast recipe wall <= 25 s each: {', '.join(f'{w:.2f}' for _, _, w in fast)} s", all(w <= 25 for _, _, w in fast))
search = {n: a for n, (a, _, _) in runs.items() if n.startswith("search-")}
if search:
    best = max(search, key=search.get)
    print(f"search: best on the validation split {best} ({search[best]:.4f}); untimed: time it with seeds 0 1 2 "
          "in a later window before reporting it")
EOF
}

# --- the runner -----------------------------------------------------------------------------------------------------
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[+$((SECONDS - START))s] $*" | tee -a "$OUT/timeline.txt"; }
pack() {  # summary and archive replaced whole (a rename), so a kill at any second leaves the last complete ones
  summary > "$OUT/.summary.txt" 2>> "$WORK/logs/summary-errors.txt" && mv -f "$OUT/.summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/.results.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.npz' --exclude='misclassified.png' . \
    && mv -f "$OUT/.results.tgz" "$OUT/results.tgz"
}

if [ "${PLAN:-0}" = 1 ]; then
  total=0
  for entry in "${LIMITS[@]}"; do
    name=${entry%%:*} limit=${entry##*:}
    [[ $PHASES == *" $name "* ]] || continue
    ((limit == 0 || total + limit > BUDGET - RESERVE)) && limit=$((BUDGET - RESERVE - total))
    ((limit < 10)) && { echo "$name: skipped (no time left)"; continue; }
    total=$((total + limit))
    printf '%-12s %4d s  (ends by %4d s)\n' "$name" "$limit" "$total"
  done
  printf '%-12s %4d s\n' packing $RESERVE
  echo "total $((total + RESERVE)) s"
  exit 0
fi

mkdir -p "$OUT" "$WORK/logs" "$WORK/runs"
say "gpu_session: BUDGET ${BUDGET}s, QUICK=$QUICK, work in $WORK, phases:$PHASES"
nvidia-smi > "$WORK/logs/nvidia-smi.txt" 2>&1
for entry in "${LIMITS[@]}"; do
  name=${entry%%:*} limit=${entry##*:}
  [[ $PHASES == *" $name "* ]] || continue
  [ "$QUICK" = 1 ] && [ "$name" = gpu-tests ] && { say "skip gpu-tests: QUICK=1 has no GPU"; continue; }
  cap=$(($(left) - RESERVE))
  ((limit == 0 || limit > cap)) && limit=$cap
  ((limit < 10)) && { say "skip $name: ${cap}s left"; continue; }
  say "start $name (limit ${limit}s)"
  # timeout runs the phase in a process group of its own and ends the whole group at the limit
  timeout --kill-after=5 "$limit" bash -c "p_$name" > "$WORK/logs/$name.txt" 2>&1 &
  echo $! > "$WORK/phase.pid"
  wait $!
  rc=$?
  say "end $name rc=$rc"
  if ((rc != 0)); then
    echo "--- last lines of $name's log:"
    tail -n 15 "$WORK/logs/$name.txt"
  fi
  pack
done
cat "$OUT/summary.txt" 2>/dev/null
say "done"
