#!/usr/bin/env bash
# The product end to end on one GPU, in about 4 minutes (one prepared device run; every part has its own time
# limit, so the script always finishes and reports):
#   1. bench_train.py: train.py against a bare loop on the GPU, bf16 (small preset, batch 32, demo latents);
#   2. train.py --mixed_precision bf16 --compile: a short run with its checkpoint, pipeline and final report;
#   3. sample.py: 512 samples, DPM-Solver++ 20 steps, bf16.
# Logs, the bench JSON, the run's metrics and a sample grid go to $OUT (default ./gpu_e2e_out); the run
# folder itself goes to $RUN_DIR (default /tmp/gpu_e2e_run), outside $OUT.
#     OUT=/some/dir bash benchmarks/gpu_e2e.sh
set -u
OUT=${OUT:-gpu_e2e_out}
RUN_DIR=${RUN_DIR:-/tmp/gpu_e2e_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, print its status
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "gpu_e2e: $name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
    tr '\r' '\n' <"$OUT/$name.log" | grep -aE 'INFO|WARN|rror|wrote|train_vs_bare|target_met' \
        | sed -E 's/^.*([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:,]+ )/\1/' | tail -n 5  # the log lines, not the bars
}

part bench_train 75 python3 benchmarks/bench_train.py --mixed_precision bf16 --windows 6 --out "$OUT/bench_train_gpu.json"
part train 110 python3 train.py --preset small --max_train_steps 400 --mixed_precision bf16 --compile \
    --output_dir "$RUN_DIR" --overwrite_output_dir
cp "$RUN_DIR/train/metrics.json" "$OUT/train_metrics.json" 2>/dev/null
cp "$RUN_DIR/train/samples.png" "$OUT/train_samples.png" 2>/dev/null
part sample 40 python3 sample.py --model "$RUN_DIR/pipeline" --num_samples 512 --scheduler dpmsolver++ \
    --num_inference_steps 20 --mixed_precision bf16 --output "$RUN_DIR/samples.npz" --overwrite
python3 - "$RUN_DIR/samples.npz" "$OUT/train_metrics.json" <<'PY'
import json
import sys
import numpy as np
try:
    e = json.load(open(sys.argv[2]))["evaluation"]
    print(f"gpu_e2e: train.py report: FD {e['fd']:.2f} ({e['fd_ratio']:.2f}x real-vs-real), "
          f"precision {e['precision']:.2f}, recall {e['recall']:.2f}, non-finite {e['num_nonfinite_samples']}")
except (OSError, KeyError, ValueError) as err:
    print(f"gpu_e2e: no train.py report ({err})")
try:
    with np.load(sys.argv[1], allow_pickle=False) as f:
        x = f["samples"]
    print(f"gpu_e2e: samples {x.shape} {x.dtype}, finite {bool(np.isfinite(x).all())}, std {float(x.std()):.3f}")
except OSError as err:
    print(f"gpu_e2e: no samples ({err})")
PY
