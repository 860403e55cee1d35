#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (bench/gpu_wheels.txt) for its Python (3.12,
# Linux x86_64) into gpu_wheels/ (git-ignored), to carry with the GPU check:
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]
# The device tool then gets carry=["gpu_wheels"], and bench/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
rm -rf gpu_wheels.part && mkdir gpu_wheels.part
for req in $(grep -v '^#' bench/gpu_wheels.txt | grep .); do
    # A binary wheel for that Python and platform; a pure-Python package published as an
    # sdist only (pretrainedmodels) is built into a py3-none-any wheel here instead.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d gpu_wheels.part "$req" > /dev/null 2>&1 \
      || python3 -m pip wheel -q --no-deps -w gpu_wheels.part "$req" > /dev/null 2>&1 \
      || { echo "gpu_wheels.sh: no wheel for $req" >&2; exit 1; }
done
count=$(ls gpu_wheels.part | wc -l)
wanted=$(grep -v '^#' bench/gpu_wheels.txt | grep -c .)
if [ "$count" -ne "$wanted" ]; then
    echo "gpu_wheels.sh: got $count of $wanted wheels:" >&2; ls gpu_wheels.part >&2; exit 1
fi
rm -rf gpu_wheels && mv gpu_wheels.part gpu_wheels
du -sh gpu_wheels && ls gpu_wheels
