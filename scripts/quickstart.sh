#!/usr/bin/env bash
# Set up .venv (first run only) and train the tiny experiment on the embedded default:
# local Ray, vLLM on CPU, one DeepSpeed rank, in-process replay. Extra arguments are Hydra
# overrides, e.g.  bash scripts/quickstart.sh steps=100 replay.max_staleness=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/rlsys train "$@"
