#!/usr/bin/env bash
# The GPU check (issue: CUDA backend). On a machine with a CUDA GPU and no network, with CUDA 13,
# the nvidia-cublas/nvidia-cusolver wheels, torch, cupy, cmake, ninja, pybind11 and
# scikit-build-core installed (the H200 image has all of them):
#   1. builds and installs the package with the CUDA backend (SADDLESCAPE_ENABLE_CUDA=ON),
#   2. runs tests/gpu and the CUDA tests of saddlescape.torch in tests/python (and, with
#      CPP_SMOKE=1, the C++ smoke test),
#   3. trains the MLP with saddlescape.torch on the GPU against the CPU (bench/gpu/torch_check.py),
#      times the optimizers' steps against torch.optim's on the GPU (bench/python/bench_torch.py
#      --device cuda), and trains with ShardedRMSProp on NCCL, one process per GPU
#      (bench/gpu/dist_check.py),
#   4. times batched inverse roots, the diagonal step and the many-seed runner
#      (bench/gpu/bench_gpu.py), printing a short table last.
# The build needs scipy-openblas32 and cmeel-eigen, which that image lacks: run
# bench/gpu/fetch_wheels.sh first where there is network, and carry .whl/.
# Usage: bash bench/gpu/check.sh   (writes logs and results to $OUT, or /tmp/saddlescape-gpu)
# DRY_RUN=1 goes on without a GPU, to check the script itself on a CPU-only machine.
# SKIP_BENCH=1 leaves out the two timing steps (bench_torch.py, bench_gpu.py): build, tests and
# the training checks alone, about 4 minutes, for a first run that leaves time for a second.
# Budget: about 7 minutes on an H200 (build ~1-2 min, tests < 1 min, training and
# bench_torch ~2 min, benchmarks <= ~3 min: the
# inverse-root routes still untimed after 200 s are skipped and say so).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/saddlescape-gpu}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -2
"$python" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"

if ls .whl/*.whl >/dev/null 2>&1; then
  stamp "installing the carried wheels (.whl)"
  "$python" -m pip install -q --no-index --no-deps .whl/*.whl || exit 1
fi

stamp "build and install with the CUDA backend"
# No build isolation: the build must see the installed nvidia wheels (cuBLAS/cuSOLVER).
if ! "$python" -m pip install -v --no-build-isolation --no-deps --no-index \
    -Ccmake.define.SADDLESCAPE_ENABLE_CUDA=ON -Cbuild-dir=build/gpu-wheel . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "check.sh: the build failed (full log: $out/build.log)"
  exit 1
fi
grep -E "saddlescape: CUDA|CUDA backend" "$out/build.log" | head -3
"$python" - <<'PY' || [[ "${DRY_RUN:-0}" == 1 ]] || exit 1
import saddlescape.cuda as c
print("saddlescape.cuda.is_available():", c.is_available(), c.unavailable_reason())
assert c.is_available(), "the CUDA backend was built but is not available"
PY

# The C++ smoke test compiles the library a second time (a minute or two); tests/gpu covers the
# same operations, so it runs only when asked for.
if [[ "${CPP_SMOKE:-0}" == 1 ]]; then
  stamp "C++ build with the CUDA smoke test"
  cmake -S . -B build/gpu-cpp -G Ninja -DPython_EXECUTABLE="$(command -v "$python")" \
    -DSADDLESCAPE_ENABLE_CUDA=ON -DSADDLESCAPE_BUILD_TESTS=OFF -DSADDLESCAPE_BUILD_BENCH=OFF \
    >"$out/cpp.log" 2>&1 && cmake --build build/gpu-cpp --target saddlescape_cuda_smoke >>"$out/cpp.log" 2>&1 \
    && build/gpu-cpp/tests/cpp/cuda/saddlescape_cuda_smoke \
    || { tail -30 "$out/cpp.log"; echo "check.sh: the C++ smoke test failed to build or pass"; }
fi

stamp "tests/gpu"
# All failures in one go (a GPU run is scarce), not -x. Deprecation, future and user warnings
# from torch/CuPy are shown rather than turned into errors by the project's filterwarnings.
timeout 240 "$python" -m pytest -q -rf --maxfail=50 tests/gpu -p no:cacheprovider \
  -W default::DeprecationWarning -W default::FutureWarning -W default::UserWarning \
  2>&1 | tee "$out/tests.log" | grep -v "^SKIPPED" | tail -40

stamp "saddlescape.torch's CUDA tests (tests/python, -k cuda)"
# The optimizers on CUDA parameters: the device engine against the CPU's host engine and a
# float64 reference, the host engine staged through host memory, the fused diagonal step.
timeout 180 "$python" -m pytest -q -rf tests/python/test_torch_optim.py \
  tests/python/test_torch_device_engine.py -k cuda -p no:cacheprovider \
  -W default::DeprecationWarning -W default::FutureWarning -W default::UserWarning \
  2>&1 | tee "$out/torch_tests.log" | grep -v "^SKIPPED" | tail -20

stamp "saddlescape.torch on the GPU against the CPU"
# The diagonal optimizers train the MLP on CUDA tensors and on CPU tensors from one start.
if [[ "${DRY_RUN:-0}" == 1 ]]; then dev=cpu; else dev=cuda; fi
timeout 180 "$python" bench/gpu/torch_check.py --device "$dev" 2>&1 | tee "$out/torch_check.log"

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  stamp "bench_torch.py on the GPU: each optimizer's step against torch.optim's, same model"
  # Both models; the block route with the device engine and with the host engine.
  if [[ "${DRY_RUN:-0}" == 1 ]]; then bargs="--quick"; else bargs="--rounds 5"; fi
  # shellcheck disable=SC2086
  timeout 240 "$python" bench/python/bench_torch.py --device "$dev" $bargs 2>&1 \
    | tee "$out/bench_torch.log" | grep -v "^$" | tail -32
fi

stamp "ShardedRMSProp on CUDA parameters with NCCL against the single-process CPU optimizer"
# One process per GPU (world size 1 on a single GPU still runs NCCL and the host-staged engine).
if [[ "${DRY_RUN:-0}" == 1 ]]; then dargs="--backend gloo --device cpu"; ngpu=2; else
  dargs=""; ngpu=$(nvidia-smi -L 2>/dev/null | wc -l); [[ "$ngpu" -ge 1 ]] || ngpu=1; fi
# shellcheck disable=SC2086
OMP_NUM_THREADS=2 timeout 120 "$python" -m torch.distributed.run --standalone \
  --nproc_per_node="$ngpu" bench/gpu/dist_check.py $dargs 2>&1 | grep -v "UserWarning\|^  " \
  | tee "$out/dist_check.log" | tail -5

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  stamp "benchmarks"
  timeout 270 "$python" bench/gpu/bench_gpu.py --budget 200 --out "$out/bench.json" 2>&1 \
    | tee "$out/bench.log"
fi
stamp "done"
