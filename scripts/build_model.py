"""Build (or find in the cache) the tiny warm-started model for the default configs.

    python scripts/build_model.py [--cache-dir DIR]

Logs the model directory and its warmstart.json (steps, val/eval greedy accuracy, seconds).
"""

import argparse
import json
import logging

from rlsys.tasks.arithmetic import TaskConfig
from rlsys.tasks.config import ModelConfig
from rlsys.tasks.tinymodel import WARMSTART_FILE, ensure_model

log = logging.getLogger("build_model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=ModelConfig.cache_dir, help="model.cache_dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = ensure_model(ModelConfig(cache_dir=args.cache_dir), TaskConfig())
    log.info("model directory: %s", path)
    log.info("%s: %s", WARMSTART_FILE, json.dumps(json.loads((path / WARMSTART_FILE).read_text())))


if __name__ == "__main__":
    main()
