#!/usr/bin/env bash
# Regenerates the image's lock files with uv (pip install uv), pinned with hashes:
#
#   deploy/requirements.lock        the worker image: pyproject.toml's dependencies and [rdkafka]
#   deploy/requirements-train.lock  the init image (trains the demo model): those and [data]
#
# torch is left out of both: the Dockerfile installs it by exact version (TORCH_SPEC) from
# PyTorch's CPU index, which is not PyPI. It is resolved here from its CPU wheel all the same,
# so the locks hold the CPU build's dependencies (sympy, networkx, ...) and none of the
# nvidia-* CUDA packages that the PyPI wheel pulls in. That wheel is downloaded from the CPU
# index, or taken from TORCH_WHEEL_DIR if set (a directory holding it).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=$(sed -n 's/^TORCH_SPEC *?= *torch==//p' Makefile)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels=${TORCH_WHEEL_DIR:-}
if [ -z "$wheels" ]; then
  wheels=$work/wheels
  pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --index-url https://download.pytorch.org/whl/cpu \
    --dest "$wheels" "torch==${torch_version}+cpu"
fi
echo "torch==${torch_version}+cpu" > "$work/torch.txt"
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --index-url https://pypi.org/simple --find-links "$wheels" --override "$work/torch.txt"
        --no-emit-package torch --custom-compile-command deploy/lock.sh)
uv pip compile pyproject.toml --extra rdkafka "${common[@]}" -o deploy/requirements.lock
uv pip compile pyproject.toml --extra data --extra rdkafka "${common[@]}" --constraint deploy/requirements.lock \
  -o deploy/requirements-train.lock
