#!/usr/bin/env bash
# Set up .venv (first run only) and run the linter: ruff's checks (pyflakes, pycodestyle, import
# order, broad excepts) and its formatter in check mode. Configuration: [tool.ruff] in
# pyproject.toml. To fix what it finds:  .venv/bin/ruff check --fix . && .venv/bin/ruff format .
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
