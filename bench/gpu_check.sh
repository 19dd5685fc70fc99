#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run:
#   1. the CUDA tests (tests/test_cuda.py) and the dA, noise and stacked-network tests;
#   2. bench/bench_speed.py on the GPU;
#   3. the default pipeline's stages on the GPU, twice in fresh copies of the repo, with the wall
#      time of each stage, and whether the two runs' metrics are identical (determinism).
# Step 3 runs the commands of dvc.yaml's stages in order, without DVC and MLflow (`track` is
# skipped): it measures the compute on the device, not the bookkeeping, which bench_pipeline.py
# measures on the CPU.
#
# Usage: bench/gpu_check.sh [out-dir]    (default: $OUT, else ./gpu_check_out)
# Needs: python3 (or $PYTHON) with a CUDA build of torch, numpy, pyyaml, tqdm, pillow,
# scikit-learn and pytest; MNIST in $SDA_CACHE_DIR (or fetchable, see sda/data.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-${OUT:-gpu_check_out}}" && cd "${1:-${OUT:-gpu_check_out}}" && pwd)
py=${PYTHON:-python3}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 SDA_DEVICE=${SDA_DEVICE:-cuda}
cd "$root"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee -a "$out/gpu.txt"

echo "== tests on CUDA"
("$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_dae.py tests/test_noise.py tests/test_stacked.py 2>&1 || true) | tail -n 30 | tee "$out/tests.txt"

echo "== bench_speed on CUDA"
"$py" bench/bench_speed.py --device "$SDA_DEVICE" ${BENCH_SPEED_ARGS:-} 2>&1 | tee "$out/bench_speed.txt"

echo "== default pipeline stages on CUDA, twice"
layers=$("$py" -c "import yaml; print(' '.join(yaml.safe_load(open('params.yaml'))['pretrain']))")
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%7.1f s", b - a }'; }
for run in 1 2; do
    work=$(mktemp -d)
    cp -r sda stages params.yaml "$work/"
    (
        cd "$work"
        total_start=$(now)
        for stage in prepare $layers finetune evaluate; do
            case $stage in prepare|finetune|evaluate) cmd=(-m "stages.$stage") ;; *) cmd=(-m stages.pretrain "$stage") ;; esac
            start=$(now)
            "$py" "${cmd[@]}" >> "$out/run${run}.log" 2>&1 || { echo "run $run: stage $stage failed:"; tail -n 20 "$out/run${run}.log"; exit 1; }
            echo "run $run  $(printf '%-10s' "$stage") $(since "$start")"
        done
        echo "run $run  $(printf '%-10s' total) $(since "$total_start")"
        cp metrics/evaluate.json "$out/run${run}_evaluate.json"
    ) | tee -a "$out/pipeline.txt"
    rm -rf "$work"
done
if cmp -s "$out/run1_evaluate.json" "$out/run2_evaluate.json"; then
    echo "the two runs' evaluate metrics are identical" | tee -a "$out/pipeline.txt"
else
    echo "the two runs' evaluate metrics DIFFER" | tee -a "$out/pipeline.txt"
fi
cat "$out/run1_evaluate.json"
