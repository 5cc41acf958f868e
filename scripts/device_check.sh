#!/bin/bash
# The figures that need a GPU, in one run (see README "Benchmarks"): end-to-end invert + edit of 16 frames
# at 512x512, T=50 (fresh process, warmed up, torch.compile), one full-size UNet step temporal vs stock,
# the step loop's per-call figures and a profile of a warm inversion. About 15 minutes with --compile. Wheels missing on the device machine go in .whl/ (git-ignored).
#   bash scripts/device_check.sh [OUT]        # OUT: folder for the logs (default bench/results)
out=${1:-bench/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
run() { local limit=$1; shift; echo "=== $*"; timeout "$limit" python3 "$@" 2>&1 | grep -v "should be kept in float32\|token_id must be"; }
{
run 150 bench/bench_end_to_end.py --device cuda
run 150 bench/bench_end_to_end.py --device cuda --warmup
run 120 bench/bench_unet_step.py --device cuda --dtype fp16 --size 512 --frames 16 --repeats 5
run 150 bench/bench_step_loop.py --device cuda --repeats 5 --no-compile
run 120 bench/profile_inversion.py
run 150 bench/bench_step_loop.py --device cuda --repeats 5 --calls-only
run 400 bench/bench_end_to_end.py --device cuda --compile --warmup
} 2>&1 | tee "$out/device_check.log"
tar czf "$out/device_results.tgz" bench/results/*.json 2>/dev/null
