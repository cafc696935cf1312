#!/usr/bin/env bash
# One-shot GPU check (issues 3 and 7) on one H100/H200: the kernels' `gpu` tests, the kernel
# benchmark with its block-size sweep, the phase-2 1.3B training-step benchmark (attention kernel x
# checkpointing variants, then the sampler stage times), a regional-compile variant, and an Nsight
# Compute profile of the kernels. At most 8 files land in $OUT: env.txt (machine + final status),
# gpu_tests.log, bench.log, bench_kernels.json, train.log, train.json, train_compile.json, ncu.txt.
# About 7-9 minutes of device time; every section has its own timeout, so one failure leaves the
# others' results.
#
# The device image has torch + triton + accelerate + peft + transformers but not omegaconf or
# diffusers. From the repo root on the dev machine, once (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         omegaconf==2.4.0 diffusers==0.42.1 importlib_metadata
# then one device call (the tree travels without .git: pass the commit, from `git describe
# --always --dirty=+dirty` here, so that the results name it):
#     run(command="INTERPDIFF_COMMIT=<describe> bash benchmarks/run_device.sh", carry=[".whl"], timeout_s=570)
# Locally on any CUDA box: OUT=runs/device bash benchmarks/run_device.sh
# The kernels alone (issue 3: every forward kernel at K = 2 / 6 / 11, the walk sweep at every K,
# the fused op through each kernel; about 4-5 minutes):
#     run(command="SECTIONS='tests kbench ncu' INTERPDIFF_COMMIT=<describe> bash benchmarks/run_device.sh", carry=[".whl"], timeout_s=400)
# SECTIONS picks a subset (default all): tests kbench train compile ncu; TRAIN_VARIANTS and
# COMPILE_VARIANTS override bench_train.py's --variants lists.
# Opt-in section `distill` (not in the default: the default already takes 7-9 minutes): the rCM
# distillation step of the 1.3B configs (benchmarks/bench_distill.py: full sCM+DMD, full discrete,
# phase1, phase2; step time, peak memory, passes, MFU, time split) -> distill.log, distill.json.
# 3.4 minutes on one H200 (2026-11-26; the full-sequence sCM step alone is 32 s a step, its JVP on
# chunked math attention), capped at 300 s; it runs last, so it cannot starve the other sections. Alone:
#     run(command="SECTIONS=distill INTERPDIFF_COMMIT=<describe> bash benchmarks/run_device.sh", carry=[".whl"], timeout_s=420)
# DISTILL_VARIANTS overrides bench_distill.py's --variants list.
# Opt-in section `jvp`: the fused attention-JVP kernel (kernels/attention_jvp.py): its `gpu` test,
# benchmarks/bench_attention_jvp.py with the tile sweep (fused vs chunked math JVP at 32,760 / 9,360
# tokens and the cross-attention), then the rCM full and phase-1 steps with distill.jvp_attention=triton
# -> jvp.log, attn_jvp.json, distill_fused.json. Not measured yet; estimated 2-4 minutes, capped at 330 s:
#     run(command="SECTIONS=jvp INTERPDIFF_COMMIT=<describe> bash benchmarks/run_device.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
SECTIONS=${SECTIONS:-"tests kbench train compile ncu"}
TRAIN_VARIANTS=${TRAIN_VARIANTS:-sdpa:full,cudnn:full,sdpa:attention,cudnn:attention}
COMPILE_VARIANTS=${COMPILE_VARIANTS:-cudnn:attention:0.7:compile:outside,cudnn:attention:0.7:compile,cudnn:attention_ffn:1:compile,cudnn:attention_ffn:0.9:compile}
DISTILL_VARIANTS=${DISTILL_VARIANTS:-full,full_discrete,phase1,phase2}
KBENCH_ARGS=${KBENCH_ARGS:-sweep=true}   # bench_kernels.py options (sweep=false: the sweep is about half the time)
# (with sweep=true bench_kernels.py writes its JSON before the sweep too, so a timeout keeps the tables)
COMPILE_ARGS=${COMPILE_ARGS:-}           # extra bench_train.py options of the compile section, e.g. --profile
# (compile variants: attention:policy:ratio:compile[:inside|outside], checkpoint placement, see wan.enable_checkpointing)
on() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -x .venv/bin/python ] && [ -z "${PY_FORCE:-}" ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
if ! $PY -c "import omegaconf, diffusers" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "run_device.sh: omegaconf/diffusers are not installed and no .whl/*.whl was carried (see the header)" | tee "$OUT/env.txt"
        exit 1
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export INTERPDIFF_COMMIT=${INTERPDIFF_COMMIT:-$(git describe --always --dirty=+dirty 2>/dev/null || echo unknown)}
T0=$SECONDS

{
    date -u
    echo "commit: $INTERPDIFF_COMMIT"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    $PY -c "import torch, triton, diffusers, peft, transformers; p = torch.cuda.get_device_properties(0); print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, '|', p.name, p.multi_processor_count, 'SMs', 'cudnn', torch.backends.cudnn.version())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

rc_tests=skipped rc_bench=skipped rc_train=skipped rc_compile=skipped rc_ncu=skipped rc_distill=skipped rc_jvp=skipped
if on tests; then
    echo "== [$((SECONDS - T0)) s] kernel gpu tests"
    timeout 100 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
    rc_tests=${PIPESTATUS[0]}
fi

if on kbench; then
    echo "== [$((SECONDS - T0)) s] kernel benchmark"
    timeout ${KBENCH_TIMEOUT:-300} $PY benchmarks/bench_kernels.py $KBENCH_ARGS json_out="$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench.log"
    rc_bench=${PIPESTATUS[0]}
fi

if on train; then
    echo "== [$((SECONDS - T0)) s] phase-2 1.3B training step variants + sampler"
    timeout 210 $PY benchmarks/bench_train.py --steps 5 --warmup 2 \
        --variants "$TRAIN_VARIANTS" --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log"
    rc_train=${PIPESTATUS[0]}
fi

if on compile; then
    echo "== [$((SECONDS - T0)) s] regional torch.compile variants" | tee -a "$OUT/train.log"
    timeout ${COMPILE_TIMEOUT:-230} $PY benchmarks/bench_train.py --steps 5 --warmup 2 --no-sampler \
        --variants "$COMPILE_VARIANTS" $COMPILE_ARGS --json "$OUT/train_compile.json" 2>&1 | tee -a "$OUT/train.log"
    rc_compile=${PIPESTATUS[0]}
fi

if on ncu && command -v ncu >/dev/null 2>&1; then
    echo "== [$((SECONDS - T0)) s] ncu"
    # first launches of each kernel at the issue sizes; DRAM/SM throughput, occupancy, registers
    timeout 60 ncu --clock-control none --launch-skip 0 --launch-count 30 -k regex:'_interp_fwd_kernel|_interp_fwd_tloop_kernel|_interp_fwd_seg_kernel|_interp_fwd_hybrid_kernel|_interp_fwd_jump_kernel|_interp_bwd_kernel|_dp_kernel|_dp_sweep_kernel|_backtrack_kernel' \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__grid_size,launch__block_size \
        $PY benchmarks/bench_kernels.py profile_only=true >"$OUT/ncu.txt" 2>&1
    rc_ncu=$?
    # the time-walk forwards (the Wan default) in detail: stall reasons, memory workload; K=6 (each
    # walk kernel: tloop, seg, hybrid, jump, jump2) and K=2 (the default)
    timeout 60 ncu --clock-control none --launch-count 6 -k regex:'_interp_fwd_tloop_kernel|_interp_fwd_seg_kernel|_interp_fwd_hybrid_kernel|_interp_fwd_jump_kernel' \
        --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
        $PY benchmarks/bench_kernels.py profile_only=true >>"$OUT/ncu.txt" 2>&1 || rc_ncu=$?
fi

# last: the longest and least certain section (opt-in, see the header)
if on distill; then
    echo "== [$((SECONDS - T0)) s] rCM distillation step, 1.3B configs"
    timeout 300 $PY benchmarks/bench_distill.py --steps 2 --warmup 1 \
        --variants "$DISTILL_VARIANTS" --json "$OUT/distill.json" 2>&1 | tee "$OUT/distill.log"
    rc_distill=${PIPESTATUS[0]}
fi

if on jvp; then
    echo "== [$((SECONDS - T0)) s] fused attention JVP: gpu test, kernel bench + sweep, rCM steps" | tee "$OUT/jvp.log"
    timeout 60 $PY -m pytest -q -m gpu tests/test_attention_jvp.py -p no:cacheprovider 2>&1 | tee -a "$OUT/jvp.log"
    rc_jvp=${PIPESTATUS[0]}
    timeout 120 $PY benchmarks/bench_attention_jvp.py sweep=true json_out="$OUT/attn_jvp.json" 2>&1 | tee -a "$OUT/jvp.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc_jvp=1
    timeout 150 $PY benchmarks/bench_distill.py --steps 2 --warmup 1 --variants full,phase1 \
        --set distill.jvp_attention=triton --json "$OUT/distill_fused.json" 2>&1 | tee -a "$OUT/jvp.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc_jvp=1
fi

echo "[$((SECONDS - T0)) s] gpu tests rc=$rc_tests, kernel bench rc=$rc_bench, train rc=$rc_train, compile rc=$rc_compile, ncu rc=$rc_ncu, distill rc=$rc_distill, jvp rc=$rc_jvp" | tee -a "$OUT/env.txt"
for rc in "$rc_tests" "$rc_bench" "$rc_train" "$rc_compile" "$rc_distill" "$rc_jvp"; do [ "$rc" = 0 ] || [ "$rc" = skipped ] || exit 1; done
