#!/usr/bin/env bash
# Builds and runs the C++ unit tests, then proves that the pip-installed package works as a CMake
# package for a third-party project (tests/cpp/consumer).
#
# Usage: tests/cpp/run_cpp_tests.sh [PYTHON] [BUILD_DIR]
#   PYTHON     interpreter with saddlescape, cmeel-eigen and scipy-openblas32 installed
#              (default: python). The C++ build finds Eigen and OpenBLAS through it.
#   BUILD_DIR  build folder (default: build/cpp under the repository root); the consumer
#              project is built in BUILD_DIR/consumer.
# Environment: SADDLESCAPE_CMAKE_ARGS, extra arguments for the main configure step (split into
#              words); SADDLESCAPE_CXX_FLAGS, one string of extra compile and link flags
#              (CMAKE_CXX_FLAGS, e.g. sanitizers); SADDLESCAPE_BENCH=OFF skips the benchmarks;
#              SADDLESCAPE_CONSUMER=0 skips the consumer project; JOBS, parallel build and
#              test jobs (default 2). tests/cpp/run_sanitizers.sh uses them.
# Needs: CMake >= 3.21, a C++17 compiler, GoogleTest with its CMake config (Debian:
# libgtest-dev); Ninja is used when it is on PATH.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python_arg="${1:-python}"
build="${2:-$repo/build/cpp}"
jobs="${JOBS:-2}"

python="$(command -v "$python_arg" || true)"
if [[ -z "$python" ]]; then
  echo "run_cpp_tests.sh: no Python interpreter '$python_arg'" >&2
  exit 2
fi
mkdir -p "$build"
build="$(cd "$build" && pwd)"

generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi

# bench/cpp is built with the tests once it exists.
bench=OFF
if [[ -f "$repo/bench/cpp/CMakeLists.txt" ]]; then
  bench="${SADDLESCAPE_BENCH:-ON}"
fi
cxx_flags=()
if [[ -n "${SADDLESCAPE_CXX_FLAGS:-}" ]]; then
  # CMake passes CMAKE_CXX_FLAGS to the link step too, which the sanitizers' runtimes need.
  cxx_flags=(-DCMAKE_CXX_FLAGS="$SADDLESCAPE_CXX_FLAGS")
fi

echo "== configure ($repo -> $build, Python $python, benchmarks $bench)"
# shellcheck disable=SC2086  # SADDLESCAPE_CMAKE_ARGS is a list of words on purpose
cmake -S "$repo" -B "$build" "${generator[@]}" \
  -DPython_EXECUTABLE="$python" \
  -DSADDLESCAPE_BUILD_TESTS=ON \
  -DSADDLESCAPE_BUILD_BENCH="$bench" \
  "${cxx_flags[@]}" \
  ${SADDLESCAPE_CMAKE_ARGS:-}

echo "== build"
cmake --build "$build" --parallel "$jobs"

echo "== ctest"
ctest --test-dir "$build" --output-on-failure --parallel "$jobs"

if [[ "${SADDLESCAPE_CONSUMER:-1}" == 0 ]]; then
  exit 0
fi
echo "== consumer project against the installed package"
if ! config_dir="$("$python" -c 'import saddlescape; print(saddlescape.cmake_dir())')"; then
  echo "run_cpp_tests.sh: $python cannot import saddlescape; pip install it first" >&2
  exit 2
fi
echo "saddlescape_DIR=$config_dir"
consumer="$build/consumer"
rm -rf "$consumer"  # a stale cache could point at another installation
cmake -S "$repo/tests/cpp/consumer" -B "$consumer" "${generator[@]}" \
  -Dsaddlescape_DIR="$config_dir"
cmake --build "$consumer" --parallel "$jobs"
# No LD_LIBRARY_PATH: the installed library must find its own dependencies (RUNPATH).
env -u LD_LIBRARY_PATH "$consumer/app"
if [[ -x "$consumer/app_native" ]]; then
  env -u LD_LIBRARY_PATH "$consumer/app_native"
fi
