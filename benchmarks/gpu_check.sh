#!/usr/bin/env bash
# The GPU check of issue 5: the full default run on the training split on one CUDA GPU, with its
# wall time, training images/s and peak GPU memory. Prepared so that a session lent a GPU can run
# it at once (`device` tool: copy the training split into an ignored folder of the checkout, carry
# it, and call this script).
#
#   bash benchmarks/gpu_check.sh TRAIN_DIR [WORK_DIR] [extra train_cxr.py flags...]
#   DEVICE=cpu bash benchmarks/gpu_check.sh TRAIN_DIR /tmp/w --epochs 1   # try the script on a CPU
#
# The official test split is held out from the developers, so the run's test folder is a stand-in
# of 100 training images per class: its test figures mean nothing; its time and speed do.
set -euo pipefail
train=$(realpath "${1:?usage: bash benchmarks/gpu_check.sh TRAIN_DIR [WORK_DIR] [flags...]}")
work=${2:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
shift $(( $# >= 2 ? 2 : 1 ))
device=${DEVICE:-cuda}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ -e "$work/data" ]; then
    echo "error: $work/data exists: pass a new WORK_DIR (nothing is overwritten)" >&2
    exit 2
fi
mkdir -p "$work/data/test"
ln -s "$train" "$work/data/train"
for cls in "$train"/*/; do
    name=$(basename "$cls")
    mkdir -p "$work/data/test/$name"
    mapfile -t files < <(find "$cls" -maxdepth 1 -type f | sort)
    for f in "${files[@]:0:100}"; do ln -s "$f" "$work/data/test/$name/"; done
done

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)"
start=$(date +%s.%N)
python "$here/train_cxr.py" --data-dir "$work/data" --device "$device" --output-dir "$work/runs" \
    --run-name check "$@" 2>&1 | tee "$work/run.log" | grep -E "^device:|^train:|training speed|best epoch|^error"
status=${PIPESTATUS[0]}
end=$(date +%s.%N)
echo "wall_seconds: $(python -c "print(round($end - $start, 1))")"
echo "exit_status: $status"
echo "log: $work/run.log"
exit "$status"
