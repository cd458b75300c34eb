"""The README's commands run as written, and its module map lists every module.

Every ``rlsys train ...`` command in README.md's fenced code blocks runs here as a user would
run it: the console script ``.venv/bin/rlsys`` from the repository root, in a fresh
environment (a user's shell: ``HOME``, a standard ``PATH``, ``HF_HUB_OFFLINE=1``; nothing from
this test session such as its Redis password or Ray settings). A few overrides are appended so
that each run is short, ``steps=2 eval_every=0 run_root=<tmp>`` (Hydra: the last value of a key
wins), and the run must exit 0 and write ``summary.json`` with ``steps == 2``. A command with
``--cfg`` only prints the composed config: it must exit 0 and show ``steps: 2``.

Skip rule (documented in docs/testing.md). A command is not run, and is reported as skipped
with the reason, when

* its code block is preceded by ``<!-- no-test: reason -->`` (blank lines in between allowed);
* it contains one of ``NEEDS`` below (a remote Ray cluster, a Redis server, a judge model, a
  GPU) or a ``<placeholder>`` the reader fills in;
* ``rlsys train`` is the argument of another program (``ray job submit -- rlsys train ...``).

Each run costs 50-70 s on a 2-core machine (about 45 s of it starting Ray, vLLM and
DeepSpeed), so keep the README's runnable ``rlsys train`` commands few.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RLSYS = ROOT / ".venv" / "bin" / "rlsys"
SHORT = ("steps=2", "eval_every=0")
"""Overrides appended to every command (plus run_root=<tmp>), so that it finishes quickly."""
RUN_TIMEOUT_S = 600
NEEDS = {
    "cluster=existing": "needs a running Ray cluster to join",
    "replay=redis": "needs a Redis server",
    "judge=openai": "needs a judge endpoint",
    "judge=vllm": "needs a judge model",
    "rollout=vllm_gpu": "needs a GPU",
    "learner=deepspeed_gpu": "needs a GPU",
}
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
NO_TEST = re.compile(r"<!--\s*no-test\s*(?::\s*(?P<reason>.*?))?\s*-->")
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>")


@dataclass(frozen=True)
class Command:
    line: str
    """The command as the README shows it (continuations joined, comment removed)."""
    argv: tuple[str, ...]
    """Everything after ``rlsys train``."""
    env: tuple[tuple[str, str], ...]
    """``VAR=value`` assignments written before the executable."""
    skip: Optional[str]
    """Why it is not run (None: it is)."""


def shell_blocks(markdown: str) -> list[tuple[list[str], Optional[str]]]:
    """(lines, no-test reason or None) of each fenced code block in a shell language."""
    blocks, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, lang = fence.group(1), fence.group(2).lower()
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        m = NO_TEST.search(lines[j]) if j >= 0 else None
        reason = (m.group("reason") or "marked no-test") if m else None
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(marker):
            end += 1
        if lang in SHELL_LANGS:
            blocks.append((lines[i + 1 : end], reason))
        i = end + 1
    return blocks


def train_commands(markdown: str) -> list[Command]:
    """Every ``rlsys train`` command of the markdown's shell blocks, with its skip reason."""
    out = []
    for body, marked in shell_blocks(markdown):
        logical, buf = [], ""
        for raw in body:
            buf += raw.rstrip()
            if buf.endswith("\\"):
                buf = buf[:-1] + " "
                continue
            logical.append(buf)
            buf = ""
        if buf:
            logical.append(buf)
        for line in logical:
            text = re.sub(r"^\s*\$\s+", "", line)
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError:
                continue
            at = next(
                (k for k in range(len(tokens) - 1) if Path(tokens[k]).name == "rlsys" and tokens[k + 1] == "train"),
                None,
            )
            if at is None:
                continue
            prefix, argv = tokens[:at], tuple(tokens[at + 2 :])
            shown = shlex.join(tokens)
            env = tuple(tuple(t.split("=", 1)) for t in prefix if re.fullmatch(r"[A-Za-z_]\w*=.*", t))
            skip = marked
            if skip is None and len(env) != len(prefix):
                skip = f"runs through another program ({prefix[0]})"
            if skip is None:
                skip = next((why for key, why in NEEDS.items() if key in argv), None)
            if skip is None and PLACEHOLDER.search(text):
                skip = "has a placeholder to fill in"
            out.append(Command(shown, argv, env, skip))
    return out


def user_env() -> dict[str, str]:
    """A fresh login-shell-like environment: no variables of this test session."""
    env = {k: os.environ[k] for k in ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["HF_HUB_OFFLINE"] = "1"
    return env


README_COMMANDS = train_commands(README.read_text())


def test_readme_shows_train_commands():
    runnable = [c for c in README_COMMANDS if c.skip is None]
    assert runnable, "found no runnable `rlsys train` command in README.md's shell code blocks"


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(
            c,
            id=" ".join(c.argv) or "default",
            marks=[pytest.mark.skip(reason=f"{c.skip}: {c.line}")] if c.skip else [],
        )
        for c in README_COMMANDS
    ],
)
def test_readme_train_command_runs(cmd: Command, tmp_path):
    assert RLSYS.is_file(), f"{RLSYS} is missing: run `bash scripts/setup.sh` first"
    argv = [str(RLSYS), "train", *cmd.argv, *SHORT, f"run_root={tmp_path}"]
    env = {**user_env(), **dict(cmd.env)}
    t0 = time.monotonic()
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"`{cmd.line}` exited {r.returncode} after {elapsed:.0f}s:\n{tail}"
    if "--cfg" in cmd.argv:
        assert re.search(r"^steps: 2$", r.stdout, re.MULTILINE), f"`{cmd.line}` printed no config:\n{tail}"
        return
    summaries = list(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 1, f"`{cmd.line}` wrote {len(summaries)} summary.json files:\n{tail}"
    summary = json.loads(summaries[0].read_text())
    assert summary["steps"] == 2, summary


def test_module_map_lists_every_module():
    text = README.read_text()
    listed = set(re.findall(r"^\|\s*`(rlsys/[\w/]+\.py)`", text, re.MULTILINE))
    present = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rlsys").rglob("*.py")}
    assert not present - listed, f"README.md's module map lacks {sorted(present - listed)}"
    assert not listed - present, f"README.md's module map lists modules that do not exist: {sorted(listed - present)}"


def test_extraction_and_skip_rule():
    md = """
```bash
.venv/bin/rlsys train a=1 \\
    b=2              # comment
rlsys train --cfg job
bash scripts/quickstart.sh steps=3
$ .venv/bin/rlsys train replay=redis
.venv/bin/rlsys train resume=<run dir>  # fill in
ray job submit --address http://h:8265 -- rlsys train cluster=existing
FOO=1 rlsys train c=3
```

<!-- no-test: needs a GPU -->

```sh
rlsys train d=4
```

```python
rlsys train not_shell=1
```
"""
    got = [(c.argv, c.env, c.skip) for c in train_commands(md)]
    assert got == [
        (("a=1", "b=2"), (), None),
        (("--cfg", "job"), (), None),
        (("replay=redis",), (), "needs a Redis server"),
        (("resume=<run", "dir>"), (), "has a placeholder to fill in"),
        (("cluster=existing",), (), "runs through another program (ray)"),
        (("c=3",), (("FOO", "1"),), None),
        (("d=4",), (), "needs a GPU"),
    ]
