#!/usr/bin/env bash
# One-shot GPU check of the Triton kernels (issue 3): the `gpu` tests, the benchmark with the
# block-size sweep, and an Nsight Compute profile of the three main kernels. Everything lands in
# $OUT (6 files: env.txt, gpu_tests.log, bench.log, bench_kernels.json, bench_kernels.md,
# ncu.txt) plus status.txt. About 3-5 minutes of device time on one H100/H200.
#
# The device image has torch + triton but not omegaconf (interpdiff.config needs it; PyYAML is
# there). From the repo root on the dev machine, once:
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: omegaconf==2.4.0 -d .whl
# then one device call (the tree travels without .git: pass the commit, from `git describe
# --always --dirty=+dirty` here, so that the results name it):
#     run(command="INTERPDIFF_COMMIT=<describe> bash benchmarks/run_device.sh", carry=[".whl"], timeout_s=540)
# Locally on any CUDA box: OUT=runs/device bash benchmarks/run_device.sh
set -uo pipefail
OUT=${OUT:-runs/device_kernels}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -x .venv/bin/python ] && [ -z "${PY_FORCE:-}" ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if ! $PY -c "import omegaconf" 2>/dev/null; then
    if ls .whl/omegaconf-*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/omegaconf-*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "run_device.sh: omegaconf is not installed and no .whl/omegaconf-*.whl was carried (see the header)" | tee "$OUT/status.txt"
        exit 1
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    date -u
    echo "commit: ${INTERPDIFF_COMMIT:-$(git describe --always --dirty=+dirty 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    $PY -c "import torch, triton; p = torch.cuda.get_device_properties(0); print('torch', torch.__version__, 'triton', triton.__version__, p.name, p.multi_processor_count, 'SMs')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 240 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}

timeout 240 $PY benchmarks/bench_kernels.py sweep=true json_out="$OUT/bench_kernels.json" md_out="$OUT/bench_kernels.md" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

rc_ncu=skipped
if command -v ncu >/dev/null 2>&1; then
    # second launch of each kernel (the first compiles); DRAM/SM throughput, occupancy, registers
    timeout 150 ncu --launch-skip 0 --launch-count 8 -k regex:'_interp_fwd_kernel|_interp_bwd_kernel|_dp_kernel|_backtrack_kernel' \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__grid_size,launch__block_size \
        $PY benchmarks/bench_kernels.py profile_only=true >"$OUT/ncu.txt" 2>&1
    rc_ncu=$?
fi

echo "gpu tests rc=$rc_tests, bench rc=$rc_bench, ncu rc=$rc_ncu" | tee "$OUT/status.txt"
[ "$rc_tests" = 0 ] && [ "$rc_bench" = 0 ]
