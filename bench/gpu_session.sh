#!/usr/bin/env bash
# Every GPU measurement this project reports, in one prepared script (GPU time is scarce: 15 minutes a session).
#
#   export PYTHONPATH=/tmp/site:$PWD                      # after ../shared/gpu/pack.sh's kit (4 calls, ~2 min)
#   DATA=/tmp/data OUT=/tmp/gpu-out PHASES=measure bash bench/gpu_session.sh; cp /tmp/gpu-out/results.tgz $OUT/
#   DATA=/tmp/data OUT=/tmp/gpu-out PHASES=recipe  bash bench/gpu_session.sh; cp /tmp/gpu-out/results.tgz $OUT/
# (two device calls of at most 10 minutes each, back to back so the machine stays warm and /tmp/gpu-out stays; the
# recipe phases reuse the measure phases' dwres step rates when they are there, and measure them again otherwise)
#
# PHASES=measure (about 8 minutes on an H200; phases are capped by BUDGET, and one that finds too little time left
# is skipped, so they run most-needed first)
#   smoke     the chunked DALI GPU loader runs and matches albumentations on explicit parameters (abort if not)
#   gpu-tests pytest's GPU cases: parity and loader contract against the real GPU graph, the CUDA-graph step held to
#             the eager one, the benchmark peers on CUDA
#   host-ops  python -m bench.host_ops on the GPU: DALI calls and torch ops per training batch between chunks (0, 0)
#   bench     python -m bench: each loader alone (albumentations 16/8/4 workers, DALI GPU, DALI CPU mode, kornia,
#             plain torch), the seed net's step alone eager and as a CUDA graph, epochs fed by each GPU loader with
#             both steps (the same step on both sides of every ratio); bs 128/512/2048
#   dwres     dwres's step alone, eager and graph, bs 128/512/1024/2048 (the fast recipe's ceiling)
#   compile   dwres's step at bs 512: our captured graph vs torch.compile(mode="reduce-overhead"), with the seconds
#             each takes to capture or compile (warmup_s)
#   profile   where a DALI-fed epoch's time goes (torch profiler summary), in case a target is missed
#   bench-cpu epochs fed by the CPU-side loaders (albumentations, DALI CPU mode), eager step only (loader-bound);
#             last, so that a phase cut by the time budget is the least needed one
# PHASES=recipe (about 5 minutes)
#   search    the fast recipe re-chosen on a 5,000-image validation split, never the test set: epochs from dwres's
#             measured graph step rate (what fits in 7 s of training), batch size x peak lr grid, 3 runs side by
#             side (accuracy only: shared GPU)
#   final     the chosen recipe, seeds 0 1 2, one at a time (the timed runs: train_seconds, wall_seconds)
#   seed      the seed recipe (60 epochs, bs 128) with the CUDA-graph step and eager, one after the other
# QUICK=1 shrinks everything to a CPU-sized smoke run (tiny data, 1 epoch): how this script is tried without a GPU.
#
# Needs torch, DALI, albumentations 2.0.x (with albucore 0.0.24), opencv, kornia (EXTRA="kornia==0.9.0 kornia-rs"
# in ../shared/gpu/pack.sh). Each phase runs under its own time limit in its own process group; at its end, only
# the processes this script started are ended (by process group), never others.
set -u
OUT=${OUT:-gpu-out}
DATA=${DATA:-$HOME/data/cifar10}
QUICK=${QUICK:-0}
PHASES=${PHASES:-measure recipe}
BUDGET=${BUDGET:-570}
PY=${PYTHON:-python3}
mkdir -p "$OUT/runs" "$OUT/logs"
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[+$((SECONDS - START))s] $*" | tee -a "$OUT/logs/timeline.txt"; }
want() { [[ " $PHASES " == *" $1 "* ]]; }
phase() {  # phase NAME SECONDS command...: run in a new process group, with a limit that never exceeds what is left
  local name=$1 limit=$2; shift 2
  local cap=$(( $(left) - 15 ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then say "skip $name: no time left"; return 1; fi
  say "start $name (limit ${limit}s)"
  # (<&0: a background command's stdin would otherwise be /dev/null, and the python phases read their script there)
  setsid timeout --kill-after=5 "$limit" "$@" <&0 > "$OUT/logs/$name.txt" 2>&1 &
  local pid=$!
  wait "$pid"
  local rc=$?
  kill -TERM -- "-$pid" 2>/dev/null  # side-by-side runs of a phase that was cut off: only this phase's group
  say "end $name rc=$rc"
  return $rc
}

if [ "$QUICK" = 1 ]; then
  SMALL=(--allow-small-data --limit-train 1024) VAL=256 DEVICE=cpu SEED_EPOCHS=1 FAST_CAP=1
  BENCH=(--quick) BENCH_SIZES=(--batch-sizes 64) DWRES_SIZES=(--batch-sizes 64) SEARCH_BS="128" SEARCH_LRS="0.4"
  STEPS=(--steps eager) PROFILE_IMAGES=1024 COMPILE_BS=64 COMPILE_MODE=default
else
  SMALL=() VAL=5000 DEVICE=cuda SEED_EPOCHS=60 FAST_CAP=40
  BENCH=() BENCH_SIZES=(--batch-sizes 128 512 2048) DWRES_SIZES=(--batch-sizes 128 512 1024 2048)
  SEARCH_BS="512 1024" SEARCH_LRS="0.4 0.8 1.6" STEPS=(--steps eager graph) PROFILE_IMAGES=50000
  COMPILE_BS=512 COMPILE_MODE=reduce-overhead
fi
# (paths must not contain spaces: COMMON is split on them in the side-by-side phases)
COMMON="--data-dir $DATA --device $DEVICE --no-progress --overwrite ${SMALL[*]}"
export PY OUT VAL COMMON
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1 || true

# --- measure ------------------------------------------------------------------------------------------------------
if want measure; then
phase smoke 120 "$PY" - "$DEVICE" <<'PY' || { say "smoke failed: stopping"; exit 3; }
import sys, time, numpy as np, torch
from pipeline import make_loader
from pipeline.albu_loader import apply_fixed
from pipeline.params import AugParams
from pipeline.spec import AugSpec
device = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (20_000, 32, 32, 3), dtype=np.uint8)
loader = make_loader("dali", x, rng.integers(0, 10, len(x)), 512, device=device)
for epoch in range(2):  # the second epoch is warm
    t = time.perf_counter(); n = sum(len(b) for b, _ in loader)
    torch.cuda.synchronize() if device == "cuda" else None
    print(f"epoch {epoch}: {n} images in {time.perf_counter() - t:.3f}s on {device}")
rows = [{"ssr": True, "angle": 4.0, "scale": 1.03, "shift_x": 1.0, "flip": True, "cutout": True, "hole_y": 3,
         "hole_x": 5, "hole_h": 6, "hole_w": 7}, {}]
out = loader.run_fixed(x[:2], AugParams.fixed(rows, device=loader.device)).cpu().permute(0, 2, 3, 1).numpy()
ref = np.stack([apply_fixed(AugSpec(), x[i], r) for i, r in enumerate(rows)])
diff = np.abs(out - ref)[:, 2:-2, 2:-2] * 255 / 2
print("max interior diff (uint8 levels):", diff.max(), "mean:", diff.mean())
assert diff.max() <= 2.5, "DALI GPU disagrees with albumentations"
print("smoke passed")
PY
grep -q "smoke passed" "$OUT/logs/smoke.txt" || { say "smoke did not run to its end: stopping"; exit 3; }
[ "$QUICK" = 1 ] || phase gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
phase host-ops 40 "$PY" -m bench.host_ops --batch-size 512
phase bench 240 "$PY" -m bench "${BENCH[@]}" "${BENCH_SIZES[@]}" "${STEPS[@]}" --out "$OUT/bench" \
  --loaders $([ "$QUICK" = 1 ] && echo "cpu dali-cpu kornia torch" || echo "cpu dali-gpu dali-cpu kornia torch") \
  --what loader model
phase bench-epochs 200 "$PY" -m bench "${BENCH[@]}" "${BENCH_SIZES[@]}" "${STEPS[@]}" --out "$OUT/bench-epochs" \
  --loaders $([ "$QUICK" = 1 ] && echo "kornia torch" || echo "dali-gpu kornia torch") --what epoch
phase dwres 60 "$PY" -m bench "${BENCH[@]}" "${DWRES_SIZES[@]}" "${STEPS[@]}" --what model --model dwres \
  --out "$OUT/bench-dwres"
# the issue's choice between the two ways to replay the step: our torch.cuda.graph capture (--steps graph) against
# torch.compile(mode="reduce-overhead") of the network (torch's own CUDA graphs), dwres at the fast recipe's batch;
# each row's warmup_s is its capture or compilation (what a 7-second run pays once)
phase compile 150 "$PY" -m bench "${BENCH[@]}" --batch-sizes "${COMPILE_BS}" "${STEPS[@]}" --what model \
  --model dwres --compile --compile-mode "${COMPILE_MODE}" --out "$OUT/bench-compile"
phase profile 60 "$PY" - "$DEVICE" "$OUT/logs/profile-dali-epoch.txt" "$PROFILE_IMAGES" <<'PY'
import sys, numpy as np, torch
from bench.core import loader_for, training_step
from train.loop import train_one_epoch
device, path, n = torch.device(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
x, y = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
name = "dali-gpu" if device.type == "cuda" else "dali-cpu"
loader = loader_for(name, x, y, 512, None, device)
for graphed in ([False, True] if device.type == "cuda" else [False]):
    step = training_step("seed", device, total_steps=4 * len(loader), steps_per_epoch=len(loader), graphed=graphed)
    if graphed:
        step.capture(*next(iter(loader)))
    train_one_epoch(step, loader, epoch=0)  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        stats = train_one_epoch(step, loader, epoch=1)
    with open(path, "a") as f:
        f.write(f"== {name}, seed net, bs 512, {'graph' if graphed else 'eager'} step: {stats['seconds']:.3f}s\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
    print(f"{'graph' if graphed else 'eager'}: epoch {stats['seconds']:.3f}s")
PY
# last: epochs fed by the CPU-side loaders are loader-bound and known from the CPU figures; the least needed here
phase bench-cpu 120 "$PY" -m bench "${BENCH[@]}" "${BENCH_SIZES[@]}" --steps eager --out "$OUT/bench-cpu" \
  --loaders cpu dali-cpu --what epoch
fi

# --- recipe -------------------------------------------------------------------------------------------------------
if want recipe; then
# Epochs of the fast recipe, from dwres's measured CUDA-graph step rate at each batch size (bench-dwres, or measured
# now): as many as fit in 7.0 s of pure model time, leaving 1 s of the 8 s target to the loader and to the epoch's
# edges; capped at FAST_CAP. Chosen from speed alone, before any accuracy is seen.
ls "$OUT"/bench-dwres/*.json > /dev/null 2>&1 || \
  phase dwres 60 "$PY" -m bench "${BENCH[@]}" "${DWRES_SIZES[@]}" "${STEPS[@]}" --what model --model dwres \
    --out "$OUT/bench-dwres"
EPOCHS_FOR=$("$PY" - "$OUT/bench-dwres" "$FAST_CAP" $SEARCH_BS <<'PY'
import glob, json, sys
cap, sizes = int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
rows = [r for p in glob.glob(sys.argv[1] + "/*.json") for r in json.load(open(p))["results"] if r["what"] == "model"]
out = []
for bs in sizes:
    rates = [r["img_per_s"] for r in rows if r["batch_size"] == bs and r["step"] == "graph"] or \
            [r["img_per_s"] for r in rows if r["batch_size"] == bs]
    out.append(f"{bs}:{max(1, min(cap, int(7.0 * max(rates) / 50_000))) if rates else cap}")
print(" ".join(out))
PY
)
say "fast recipe epochs per batch size (7 s of dwres steps): $EPOCHS_FOR"
export EPOCHS_FOR SEARCH_LRS
search() {  # every (batch size, lr) on the validation split, 3 at a time
  local n=0
  for pair in $EPOCHS_FOR; do
    local bs=${pair%%:*} epochs=${pair##*:}
    for lr in $SEARCH_LRS; do
      $PY -m train --recipe fast --batch-size "$bs" --epochs "$epochs" --lr "$lr" --val-split "$VAL" $COMMON \
        --out "$OUT/runs/search-bs$bs-lr$lr" > "$OUT/logs/search-bs$bs-lr$lr.txt" 2>&1 &
      n=$((n + 1)); (( n % 3 == 0 )) && wait
    done
  done
  wait
}
export -f search
phase search 200 bash -c search
CHOSEN=$("$PY" - "$OUT/runs" "$EPOCHS_FOR" <<'PY'
import glob, json, sys
epochs = dict(p.split(":") for p in sys.argv[2].split())
runs = []
for path in glob.glob(sys.argv[1] + "/search-bs*/metrics.json"):
    m = json.load(open(path))
    if m["epochs"] and "val_acc" in m["epochs"][-1]:
        runs.append((m["epochs"][-1]["val_acc"], m["config"]["batch_size"], m["config"]["lr"]))
acc, bs, lr = max(runs) if runs else (None, 512, 0.8)
print(f"--batch-size {bs} --epochs {epochs.get(str(bs), 19)} --lr {lr}")
PY
)
say "chosen on the validation split: $CHOSEN"
for seed in 0 1 2; do
  phase "fast-seed$seed" 45 "$PY" -m train --recipe fast $CHOSEN --seed "$seed" $COMMON --out "$OUT/runs/fast-seed$seed"
done
phase seed-graph 120 "$PY" -m train --recipe seed --epochs "$SEED_EPOCHS" --cuda-graph auto $COMMON \
  --out "$OUT/runs/seed-recipe-graph"
phase seed-eager 200 "$PY" -m train --recipe seed --epochs "$SEED_EPOCHS" --cuda-graph off $COMMON \
  --out "$OUT/runs/seed-recipe-eager"
fi

# --- pack: metrics, bench reports and small plots in one archive (the device returns few files) ---------------------
say "packing"
tar -czf "$OUT/results.tgz" -C "$OUT" --exclude='*.pt' --exclude='*.npz' --exclude='misclassified.png' \
  $(cd "$OUT" && ls -d runs bench* logs 2>/dev/null)
"$PY" - "$OUT" > "$OUT/summary.txt" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(sys.argv[1] + "/runs/*/metrics.json")):
    m = json.load(open(path)); e = m["epochs"][-1]; key = "val" if "val_acc" in e else "test"
    print(f"{os.path.basename(os.path.dirname(path)):24s} epochs {len(m['epochs']):3d}/{m['config']['epochs']:3d} "
          f"bs {m['config']['batch_size']:5d} lr {m['config']['lr']:<5} {key} {e.get(key + '_acc', float('nan')):.4f} "
          f"train_s {m['train_seconds']:7.2f} wall_s {m.get('wall_seconds', float('nan')):7.2f} "
          f"graph {m.get('resolved', {}).get('cuda_graph')}")
for path in sorted(glob.glob(sys.argv[1] + "/bench*/*.json")):
    for r in json.load(open(path))["results"]:
        # a compiled row's step is "eager" too (torch.compile of the network, the step around it eager): its mode
        # tells it from the plain eager row, and warmup_s is what the compile phase compares
        print(f"{r['what']:6s} {r['loader'] or 'model':11s} bs {r['batch_size']:5d} step {r.get('step') or '-':5s} "
              f"workers {r['workers'] if r['workers'] is not None else '-':>3} {r['img_per_s']:12,.0f} img/s"
              + (f"  epoch {r['epoch_s']:.3f}s" if r.get("epoch_s") else "")
              + (f"  compile {r['compile_mode']}" if r.get("compile_mode") else "")
              + (f"  warmup {r['warmup_s']:.2f}s" if r.get("warmup_s") is not None else ""))
PY
cat "$OUT/summary.txt"
say "done"
