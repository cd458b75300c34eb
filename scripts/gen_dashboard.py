"""Generate the Grafana dashboard ``deploy/grafana/rlsys.json`` from the metrics rlsys exports.

    python scripts/gen_dashboard.py            # write deploy/grafana/rlsys.json
    python scripts/gen_dashboard.py --check    # exit 1 if the committed file is out of date

The panels are built by introspecting the registry of ``rlsys.observability.metrics.Metrics`` (the one
module where every metric is declared), so a panel cannot exist for a metric that does not:
add a metric there, rerun this script, commit both. Queries by metric type:

    counter     rate(<name>_total[1m])                                   (per second)
    gauge       <name>
    histogram   histogram_quantile(q, sum(rate(<name>_bucket[5m])) by (le)), q = 0.5 and 0.95

One row per role; the role is the metric's prefix (``rlsys_<role>_...``, the same vocabulary
as the ``conf/`` groups). A metric whose role has no row is an error here, not a silent gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "grafana" / "rlsys.json"

# (row title, role prefixes shown in it), in dashboard order.
ROWS = [
    ("controller / learner", ("controller", "learner")),
    ("rollout", ("rollout",)),
    ("reward + judge", ("reward", "judge")),
    ("scheduler", ("scheduler",)),
    ("replay", ("replay",)),
]
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SELECTOR = '{run=~"$run"}'
RUN_VARIABLE_METRIC = "rlsys_learner_policy_version"
LEGEND = "{{run}} {{role}} {{index}}"  # target labels from the run's file_sd list
PANEL_W, PANEL_H, PER_LINE = 8, 8, 3
QUANTILES = (0.5, 0.95)


def role_of(name: str) -> str:
    """``rlsys_<role>_...`` -> role."""
    parts = name.split("_")
    if len(parts) < 3 or parts[0] != "rlsys":
        raise ValueError(f"metric {name!r} does not follow rlsys_<role>_<name>_<unit> (rlsys/observability/metrics.py)")
    return parts[1]


def unit_of(name: str, kind: str) -> str:
    """Grafana unit for a metric family, from its name's unit suffix."""
    if name.endswith("_seconds"):
        return "s"
    if name.endswith(("_ratio", "_fraction", "_agreement", "_accuracy")):
        return "percentunit"
    return "short"


def queries(name: str, kind: str) -> list[tuple[str, str]]:
    """(PromQL, legend) pairs for one metric family."""
    if kind == "counter":
        return [(f"rate({name}_total{SELECTOR}[1m])", LEGEND)]
    if kind == "gauge":
        return [(f"{name}{SELECTOR}", LEGEND)]
    if kind == "histogram":
        return [
            (f"histogram_quantile({q}, sum(rate({name}_bucket{SELECTOR}[5m])) by (le))", f"p{round(q * 100)}")
            for q in QUANTILES
        ]
    raise ValueError(f"metric {name!r} has type {kind!r}; gen_dashboard.py knows counter, gauge and histogram")


def metric_families() -> list[tuple[str, str, str]]:
    """(name, type, help) of every family rlsys exports (the controller's registry, then each
    actor role's), in declaration order."""
    sys.path.insert(0, str(ROOT))
    from rlsys.observability.metrics import all_registries

    return [(f.name, f.type, f.documentation) for r in all_registries() for f in r.collect()]


def panel(pid: int, name: str, kind: str, doc: str, x: int, y: int) -> dict:
    suffix = {"counter": " (per second)", "histogram": " (p50, p95)"}.get(kind, "")
    return {
        "id": pid,
        "type": "timeseries",
        "title": doc + suffix,
        "description": f"{name} ({kind}): {doc}",
        "datasource": DS,
        "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit_of(name, kind)}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
            for i, (expr, legend) in enumerate(queries(name, kind))
        ],
    }


def build(families: list[tuple[str, str, str]]) -> dict:
    by_row: dict[str, list] = {title: [] for title, _ in ROWS}
    row_of_role = {role: title for title, roles in ROWS for role in roles}
    for name, kind, doc in families:
        role = role_of(name)
        if role not in row_of_role:
            raise ValueError(
                f"metric {name!r} has role {role!r}, which no dashboard row shows; "
                f"add it to ROWS in {Path(__file__).name}"
            )
        by_row[row_of_role[role]].append((name, kind, doc))

    panels, pid, y = [], 1, 0
    for title, roles in ROWS:
        members = by_row[title]
        if not members:
            continue
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, (name, kind, doc) in enumerate(members):
            panels.append(panel(pid, name, kind, doc, (i % PER_LINE) * PANEL_W, y + (i // PER_LINE) * PANEL_H))
            pid += 1
        y += -(-len(members) // PER_LINE) * PANEL_H

    return {
        "title": "rlsys",
        "uid": "rlsys",
        "description": "rlsys training run, one row per role. Generated by scripts/gen_dashboard.py from "
        "rlsys/observability/metrics.py; do not edit by hand.",
        "tags": ["rlsys"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                {
                    "name": "run",
                    "label": "run",
                    "type": "query",
                    "datasource": DS,
                    "definition": f"label_values({RUN_VARIABLE_METRIC}, run)",
                    "query": {"query": f"label_values({RUN_VARIABLE_METRIC}, run)", "refId": "run"},
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "options": [],
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(metric_families()), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed dashboard is out of date")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python scripts/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
