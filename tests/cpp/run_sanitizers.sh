#!/usr/bin/env bash
# Builds the C++ unit tests (and the library they link) with AddressSanitizer and
# UndefinedBehaviorSanitizer and runs them; any sanitizer report fails the run.
#
# Usage: tests/cpp/run_sanitizers.sh [PYTHON] [BUILD_DIR]
#   PYTHON     as for run_cpp_tests.sh (finds Eigen and OpenBLAS; default: python)
#   BUILD_DIR  build folder (default: build/cpp-sanitizers under the repository root)
# Environment: JOBS (default 2); SANITIZER_OPT (default -O1, what the sanitizers' authors
# recommend: a quick build and run with exact stacks); SANITIZER_CMAKE_ARGS, extra configure
# arguments.
#
# It reuses run_cpp_tests.sh (same configure, build and ctest) with extra flags, without the
# benchmarks and the consumer project, which test packaging rather than memory.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python_arg="${1:-python}"
build="${2:-$repo/build/cpp-sanitizers}"

# -fno-sanitize-recover=all: UBSan aborts at its first report instead of printing and going
# on, so ctest sees a failed test. -fno-omit-frame-pointer: usable stacks in reports.
# Debug (-g, no NDEBUG) keeps Eigen's index assertions; _GLIBCXX_ASSERTIONS adds the standard
# library's (vector::operator[] bounds among them), which ASan cannot see inside capacity.
export SADDLESCAPE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all ${SANITIZER_OPT:--O1} -D_GLIBCXX_ASSERTIONS"
# Not the caller's SADDLESCAPE_CMAKE_ARGS (CI sets CUDA options there): host code only.
export SADDLESCAPE_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Debug -DSADDLESCAPE_ENABLE_CUDA=OFF ${SANITIZER_CMAKE_ARGS:-}"
export SADDLESCAPE_BENCH=OFF
export SADDLESCAPE_CONSUMER=0

# halt_on_error + exitcode: a report ends the process with a non-zero status. detect_leaks:
# LeakSanitizer at exit (it needs ptrace-like thread suspension, which works in plain
# containers; set ASAN_OPTIONS yourself to turn it off where it does not).
export ASAN_OPTIONS="${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=0:exitcode=23:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:exitcode=24}"
export LSAN_OPTIONS="${LSAN_OPTIONS:-exitcode=25}"
# OpenBLAS is not instrumented; one thread keeps its spinning workers out of the 2-core CI
# runner (ctest's CMakeLists sets it per test too, this covers the test listing).
export OPENBLAS_NUM_THREADS=1

exec bash "$repo/tests/cpp/run_cpp_tests.sh" "$python_arg" "$build"
