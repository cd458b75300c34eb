"""The package's shape, kept by tests: a light configuration, a pure core, no import cycles, and
modules a reader can take in (README, "Module map")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rlsys"

PURE = [
    "rlsys.records",
    "rlsys.scheduling.allocation",
    "rlsys.scheduling.sampling",
    "rlsys.scheduling.scheduler",
    "rlsys.reward.routing",
    "rlsys.learner.losses",
    "rlsys.learner.batch",
    "rlsys.replay.codec",
]
"""Core logic on plain data: no Ray, vLLM, Redis or DeepSpeed (torch and numpy are fine)."""
RUNTIME = ("ray", "vllm", "redis", "deepspeed")
HEAVY_FOR_CONFIG = ("torch", "transformers", "vllm", "ray")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """Every module an import statement in ``name`` names, at module level or inside a function
    (``from pkg import sub`` counts as pkg.sub when sub is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    is_pkg = MODULES[name].name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
    return out


def imports_in_a_fresh_interpreter(*modules: str) -> set[str]:
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_config_loads_no_framework():
    loaded = imports_in_a_fresh_interpreter("rlsys.config")
    assert not loaded & set(HEAVY_FOR_CONFIG), sorted(loaded & set(HEAVY_FOR_CONFIG))


def test_the_scan_sees_what_an_import_loads():
    """The fresh-interpreter check can fail: a module that imports torch (or Redis) does load it."""
    loaded = imports_in_a_fresh_interpreter("rlsys.learner.losses", "rlsys.replay.redis_store")
    assert {"torch", "redis"} <= loaded


def test_pure_modules_import_no_runtime_service():
    loaded = imports_in_a_fresh_interpreter(*PURE)
    assert not loaded & set(RUNTIME), sorted(loaded & set(RUNTIME))
    for name in PURE:  # not even inside a function
        named = {m.split(".")[0] for m in imported_modules(name)}
        assert not named & set(RUNTIME), (name, sorted(named & set(RUNTIME)))


def import_graph() -> dict[str, set[str]]:
    return {name: {m for m in imported_modules(name) if m in MODULES and m != name} for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    """Function-local imports count: one that dodges a cycle at import time is still a cycle."""
    graph = import_graph()
    assert len(graph) > 30 and graph["rlsys.controller.loop"]  # the scan sees the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name):
    assert len(MODULES[name].read_text().splitlines()) <= 600, f"{name} is over 600 lines: split it"


def test_the_controller_reads_in_one_sitting():
    tree = ast.parse(MODULES["rlsys.controller.loop"].read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Controller"]
    assert cls.end_lineno - cls.lineno + 1 < 450


def test_the_control_commands_load_no_ml_framework():
    """``rlsys status / scale / stop`` import the cluster helpers and the control actor's name;
    torch and transformers would cost seconds on every call."""
    loaded = imports_in_a_fresh_interpreter("rlsys.cli", "rlsys.controller.cluster", "rlsys.controller.elastic")
    assert not loaded & {"torch", "transformers", "vllm", "deepspeed"}
