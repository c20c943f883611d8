#!/usr/bin/env bash
# Run scripts/gpu_checks.py on a GPU machine whose image has torch, transformers, Lightning and tensorboard but not
# the rest of this project's dependencies (and no network): carry them as wheels.
#
#   scripts/gpu_setup.sh download        # here, with network: wheels for Python 3.12 into .whl/ (git-ignored)
#   scripts/gpu_setup.sh run OUT_DIR [ARGS]  # there: install the wheels into /tmp/site, run gpu_checks.py ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

case "${1:-}" in
download)
  grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >>.git/info/exclude
  for package in "${PACKAGES[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$package" ||
      python3 -m pip download --no-deps --no-binary=:none: -d .whl "$package"  # pure-Python sdists (antlr4)
  done
  for sdist in .whl/*.tar.gz; do  # build pure-Python sdists here: the GPU machine has no index to build from
    [ -e "$sdist" ] && python3 -m pip wheel -q --no-deps -w .whl "$sdist" && rm "$sdist"
  done
  ls .whl
  ;;
run)
  out="${2:?usage: scripts/gpu_setup.sh run OUT_DIR [gpu_checks.py arguments]}"
  shift 2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*
  export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  python3 scripts/gpu_checks.py --out "$out" "$@"
  ;;
*)
  sed -n '2,6p' "$0"
  exit 2
  ;;
esac
