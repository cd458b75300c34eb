#!/usr/bin/env bash
# Set up .venv (first run only) and run the test suite: unit tests, then integration tests
# with a real local Ray cluster, vLLM on CPU and DeepSpeed (gloo). Extra arguments go to
# pytest, e.g.  bash scripts/test.sh tests/unit -k replay   or   bash scripts/test.sh --runslow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest tests -q --timeout=900 -p no:cacheprovider --durations=20
