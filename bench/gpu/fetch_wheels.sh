#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels the GPU machine lacks for building
# saddlescape (it has no network): scipy-openblas32 and cmeel-eigen (with cmeel), for the
# Python 3.12 there, into .whl/ at the repository root. .whl/ is ignored by git; name it in the
# device tool's `carry` so that it travels with the working tree (about 13 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "scipy-openblas32>=0.3.27" "cmeel-eigen>=3.4,<3.5" cmeel
ls -la .whl
