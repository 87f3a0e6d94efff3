#!/usr/bin/env bash
# `gpu_bench.py --plan frontier` on a GPU machine that cannot reach a package index.
#
#   bench/gpu_frontier.sh wheels   # here, with internet: the wheels that machine lacks, into .whl/ (git ignores it)
#   bench/gpu_frontier.sh          # there, with .whl/ carried along: install them, then the plan
#
# The plan's table (card, CUDA, torch, DeepSpeed and torchao versions with it) goes to
# $OUT/gpu_frontier.md, its log to $OUT/gpu_frontier.log. BUDGET (seconds, default 440) bounds the
# measurements; DeepSpeed's FusedAdam is built once, in the first row.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(deepspeed==0.19.8 transformers==5.24.0 torchao==0.18.0 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5)

if [[ ${1:-} == wheels ]]; then
  set -e
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]:1}"
  python3 -m pip wheel -q --no-deps -w .whl "${WHEELS[0]}"  # DeepSpeed ships as source: pure Python
  ls .whl
  exit 0
fi

out=${OUT:-bench/out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 bench/gpu_bench.py --plan frontier --no-record --budget "${BUDGET:-440}" --out "$out/gpu_frontier.md" 2>&1 \
  | tee "$out/gpu_frontier.log"
