"""Deployment artifacts, checked without a cluster or a Docker engine.

Dockerfile (hadolint + structure), .dockerignore, the compose stack, the Grafana dashboard and its
provisioning, the Prometheus config and rules (promtool check + unit tests), and the Kubernetes
manifests (schema validation of the core kinds, structure of the CRDs). tests/test_observability.py
runs the dashboard and rules against a live service and Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lensnet.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "lensnet.rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
ADAPTER_VALUES = DEPLOY / "helm" / "prometheus-adapter-values.yaml"  # Helm inputs live beside, not among, manifests
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def tool(name: str) -> str:
    """Path of a CLI tool (the virtualenv's first, e.g. hadolint); skip (CI installs it) when it is missing."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap test installs it)")
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [arguments for name, arguments in self.instructions if name == instruction]


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if logical and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        instruction, _, arguments = logical.strip().partition(" ")
        yield instruction.upper(), arguments.strip()
        logical = ""


def dockerfile_stages() -> dict[str, Stage]:
    build_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "ARG" and current is None:
            name, _, default = arguments.partition("=")
            build_args[name] = default
        elif instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arguments, re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], match.group(1))
            current = stages[match.group(2)] = Stage(match.group(2), base)
        else:
            assert current is not None, f"{instruction} before the first FROM"
            current.instructions.append((instruction, arguments))
    return stages


FINAL_STAGES = ("cpu", "gpu")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    result = run(hadolint, "--config", DEPLOY / ".hadolint.yaml", "--no-color", "--format", "json", DOCKERFILE)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], result.stdout + result.stderr


def test_dockerfile_has_cpu_and_gpu_targets_from_the_right_bases() -> None:
    stages = dockerfile_stages()
    assert set(FINAL_STAGES) <= stages.keys()
    assert list(stages)[-1] == "gpu", "the default target (last stage) is the GPU image"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stages["cpu"].base)
    # CUDA comes from onnxruntime-gpu's nvidia-* wheels, so the GPU image needs no CUDA base.
    assert re.fullmatch(r"ubuntu:2[4-9]\.04", stages["gpu"].base)


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_final_stage_runs_lensnet_serve_unprivileged(target: str) -> None:
    stage = dockerfile_stages()[target]
    assert stage.args("ENTRYPOINT") == ['["lensnet-serve"]'], "exec form, so lensnet-serve is PID 1 and gets SIGTERM"
    assert not stage.args("CMD")
    (user,) = stage.args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID (Kubernetes runAsNonRoot can verify it)"
    assert stage.args("EXPOSE") == ["8000"]
    (healthcheck,) = stage.args("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/healthz" in command[-1]


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_final_stage_environment_is_valid_settings(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = dockerfile_stages()[target]
    env = dict(pair.split("=", 1) for arguments in stage.args("ENV") for pair in shlex.split(arguments) if "=" in pair)
    lensnet = {key: value for key, value in env.items() if key.startswith("LENSNET_")}
    assert lensnet["LENSNET_HOST"] == "0.0.0.0"
    # The model the image ships is where LENSNET_MODEL_DIR points (the package-relative default
    # does not exist in a non-editable install).
    assert f"models/default {lensnet['LENSNET_MODEL_DIR']}" in stage.args("COPY")
    for key, value in lensnet.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert str(settings.model_dir) == lensnet["LENSNET_MODEL_DIR"]
    assert env["PATH"].startswith("/opt/lensnet/venv/bin:")


def test_final_stages_carry_no_build_tools_or_training_stack() -> None:
    stages = dockerfile_stages()
    for target in FINAL_STAGES:
        runs = " ".join(stages[target].args("RUN"))
        assert "pip install" not in runs, f"{target}: packages come from the venv stage, built elsewhere"
        assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev|python3-venv|curl|wget)\b", runs), target
        copies = stages[target].args("COPY")
        assert all("--from=" not in c or c.startswith(f"--from={target}-venv ") for c in copies), copies
    instructions = " ".join(arguments for _, arguments in dockerfile_instructions(DOCKERFILE.read_text()))
    assert not re.search(r"\btorch\b|\bonnx\b(?!runtime)|\[export\]|\[test\]", instructions, re.IGNORECASE)


def test_gpu_image_installs_onnxruntime_gpu_and_cpu_image_onnxruntime() -> None:
    stages = dockerfile_stages()
    assert "requirements-cpu.txt" in " ".join(stages["cpu-venv"].args("RUN"))
    assert "requirements-gpu.txt" in " ".join(stages["gpu-venv"].args("RUN"))
    assert stages["gpu-venv"].base == stages["gpu"].base, "the venv's Python must be the final image's"
    assert stages["cpu-venv"].base == stages["cpu"].base


def load_requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_requirements", DEPLOY / "docker" / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_requirements_follow_the_project_dependencies() -> None:
    requirements = load_requirements_module()
    cpu, gpu = requirements.requirements("cpu"), requirements.requirements("gpu")
    names = {variant: {requirements._name(r) for r in reqs} for variant, reqs in (("cpu", cpu), ("gpu", gpu))}
    project = {requirements._name(r) for r in _project_dependencies(ROOT / "pyproject.toml")}
    client = {requirements._name(r) for r in _project_dependencies(ROOT / "clients" / "pyproject.toml")}
    expected = (project | client) - {"lensnet-client"}
    assert names["cpu"] == expected
    assert names["gpu"] == expected - {"onnxruntime"} | {"onnxruntime-gpu"}
    assert not {"torch", "onnx", "onnxscript", "safetensors"} & (names["cpu"] | names["gpu"])
    # onnxruntime-gpu >= 1.27 is built for CUDA 13, whose libraries its [cuda,cudnn] extras bring.
    assert "onnxruntime-gpu[cuda,cudnn]>=1.27" in gpu
    with pytest.raises(ValueError, match="variant"):
        requirements.requirements("tpu")


def _project_dependencies(path: Path) -> list[str]:
    import tomllib

    return tomllib.loads(path.read_text())["project"]["dependencies"]


# --- .dockerignore ------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out: the last matching pattern (on the path or a
    parent directory) decides, `!` patterns re-include."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = str(PurePosixPath(raw.lstrip("!").strip("/")))
        regex = _dockerignore_regex(pattern)
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = dockerignore_patterns()
    sources = []
    for stage in dockerfile_stages().values():
        for copy in stage.args("COPY"):
            if "--from=" in copy:
                continue
            sources += [s.rstrip("/") for s in copy.split()[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "README.md", "clients", "service", "model_export", "models/default"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        files = source_files(source)
        assert files and not [f for f in files if dockerignored(f, patterns)], source


def source_files(path: str) -> list[str]:
    """The files under `path` that a clone has (tracked or not git-ignored; no build leftovers)."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "--", path)
    if listed.returncode == 0:
        return [line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]
    root = ROOT / path  # not a git checkout
    candidates = [root] if root.is_file() else root.rglob("*")
    return [
        str(p.relative_to(ROOT))
        for p in candidates
        if p.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in p.parts)
    ]


def test_dockerignore_leaves_out_local_state() -> None:
    patterns = dockerignore_patterns()
    local = [
        ".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "service/__pycache__/app.cpython-311.pyc",
        "lensnet_focus.egg-info/PKG-INFO", "models/other/manifest.json", "deploy/k8s/deployment.yaml",
    ]  # fmt: skip
    for path in local:
        assert dockerignored(path, patterns), path
    assert not dockerignored("deploy/docker/requirements.py", patterns)


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    result = run(tool("promtool"), "check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, "rule_files resolves to the rules file"


def test_rules_are_valid() -> None:
    result = run(tool("promtool"), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


ALERTS = {rule["alert"]: rule for rule in rules() if "alert" in rule}


def test_the_issue_s_alerts_exist() -> None:
    expressions = {name: rule["expr"] for name, rule in ALERTS.items()}
    assert "> 0.003" in expressions["LensNetLatencyP99OverBudget"]
    assert {"LensNetLatencySLOFastBurn", "LensNetLatencySLOSlowBurn"} <= ALERTS.keys()
    assert "request_errors" in expressions["LensNetHighErrorRatio"]
    assert "overloaded" in expressions["LensNetOverloaded"]
    assert "clamp_ratio" in expressions["LensNetClampRateSpike"]
    assert "offset" in expressions["LensNetScoreMedianShift"] and "offset" in expressions["LensNetScoreSaturationShift"]
    assert "lensnet_model_ready == 0" in expressions["LensNetModelNotReady"]
    assert "lensnet_policy_correlation{" in expressions["LensNetPolicyPolarityFlipped"]
    assert "-2 / sqrt(lensnet_policy_correlation_samples" in expressions["LensNetPolicyPolarityFlipped"]
    assert "abs(lensnet_policy_correlation{" in expressions["LensNetPolicyCorrelationWeak"]


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_is_documented_and_routed(name: str) -> None:
    rule = ALERTS[name]
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 40
    assert f"`{name}`" in (DEPLOY / "README.md").read_text(), "deploy/README.md has a runbook entry"


def _alert_cases() -> dict[str, set[str]]:
    """For each alert: whether some promtool test expects it to fire ('fires') or stay quiet ('quiet')."""
    cases: dict[str, set[str]] = {}
    for path in RULE_TESTS:
        for test in load_yaml(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], set()).add("fires" if case.get("exp_alerts") else "quiet")
    return cases


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_has_firing_and_quiet_unit_tests(name: str) -> None:
    assert _alert_cases().get(name) == {"fires", "quiet"}


def test_every_recording_rule_is_checked_by_a_unit_test() -> None:
    tests = [test for path in RULE_TESTS for test in load_yaml(path)["tests"]]
    checked = " ".join(case["expr"] for test in tests for case in test.get("promql_expr_test", []))
    for rule in rules():
        if "record" in rule:
            assert re.search(rf"\b{re.escape(rule['record'])}\b", checked), rule["record"]


def test_prometheus_rule_crd_matches_the_rules_file() -> None:
    (crd,) = load_yaml_all(K8S / "prometheus-rule.yaml")
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["spec"]["groups"] == load_yaml(RULES)["groups"], "deploy/k8s/prometheus-rule.yaml is out of date"


# --- Grafana ------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}


def test_dashboard_schema_and_unique_panel_ids() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] == "lensnet-focus" and board["id"] is None
    ids = [panel["id"] for panel in all_panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert all(isinstance(i, int) for i in ids)


def test_dashboard_datasource_is_an_input_and_a_variable_used_everywhere() -> None:
    board = dashboard()
    (input_,) = board["__inputs"]
    assert input_ == {**input_, "name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert datasource["current"]["value"] == "${DS_PROMETHEUS}", "on import the chosen datasource becomes the default"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE_REF, variable["name"]
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]
    # Nothing else may pin a datasource: the only datasource strings are the variable and the input.
    refs = set(re.findall(r'"uid": "([^"]*)"', DASHBOARD.read_text()))
    assert refs <= {"${datasource}", "lensnet-focus", "-- Grafana --"}, refs


def test_dashboard_uses_only_defined_variables() -> None:
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_BUILTINS
    text = json.dumps(board)
    used = set(re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", text))
    names = {a or b for a, b in used} - {"DS_PROMETHEUS"}
    assert names <= defined, names - defined


def panel_exprs(panel: dict[str, Any]) -> str:
    return " ".join(target["expr"] for target in panel.get("targets", []))


def find_panels(board: dict[str, Any], **where: str) -> list[dict[str, Any]]:
    found = []
    for panel in all_panels(board["panels"]):
        exprs = panel_exprs(panel)
        if panel["type"] == where.get("type", panel["type"]) and re.search(where.get("expr", ""), exprs):
            found.append(panel)
    return found


def test_dashboard_has_the_issue_s_panels() -> None:
    board = dashboard()
    required = {
        "request rate": {"expr": r"rate\(lensnet_request_duration_seconds_count"},
        "error ratio": {"expr": r'status=~"5\.\."'},
        "latency quantiles": {"expr": r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(lensnet_request_duration"},
        "latency heatmap": {"type": "heatmap", "expr": r"lensnet_request_duration_seconds_bucket"},
        "stage breakdown": {"expr": r"lensnet_stage_duration_seconds.*decode\|model\|allocate\|encode"},
        "over budget": {"expr": r"lensnet_requests_over_budget_total"},
        "score heatmap by LOD": {"type": "heatmap", "expr": r'lensnet_entry_score_bucket\{.*lod=~"\$lod"'},
        "edits by action and LOD": {"expr": r"sum by \(action, lod\) \(rate\(lensnet_edits_total"},
        "edits per request": {"expr": r'lensnet_edits_total.*endpoint="/v1/focus"'},
        "clamp rate": {"expr": r"lensnet_clamps_total"},
        "refusals by reason": {"expr": r"sum by \(reason\) \(rate\(lensnet_requests_refused_total"},
        "in-flight": {"expr": r"lensnet_in_flight_requests"},
        "WC size": {"expr": r"lensnet_working_context_entries"},
        "model info": {"expr": r"lensnet_model_info"},
        "policy correlation": {"expr": r'lensnet_policy_correlation\{.*window="count"'},
        "feedback results": {"expr": r"sum by \(result\) \(rate\(lensnet_feedback_items_total"},
        "delta NLL": {"expr": r"lensnet_feedback_delta_nll_bucket"},
        "trace records": {"expr": r"lensnet_trace_records_dropped_total"},
        "shadow agreement": {"expr": r"lensnet_shadow_shared_edits_total.*lensnet_shadow_live_edits_total"},
    }
    for what, where in required.items():
        assert find_panels(board, **where), what
    (score,) = find_panels(board, type="heatmap", expr="lensnet_entry_score_bucket")
    assert score["repeat"] == "lod", "one score heatmap per LOD"
    for heatmap in find_panels(board, type="heatmap"):
        (target,) = heatmap["targets"]
        assert target["format"] == "heatmap" and target["expr"].startswith("sum by (le) (increase(")
        assert heatmap["options"]["calculate"] is False, "Prometheus buckets, not Grafana-side bucketing"
    (model,) = find_panels(board, expr="lensnet_model_info")
    assert all(label in model["targets"][0]["expr"] for label in ("version", "precision", "provider"))


def test_grafana_provisioning_points_at_the_compose_services() -> None:
    (source,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval, "$__rate_interval follows the scrape interval"
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "lensnet.yml")["providers"]
    assert provider["type"] == "file"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("."))
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# --- compose ------------------------------------------------------------------------------------


def test_compose_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"lensnet", "prometheus", "grafana"}
    lensnet = services["lensnet"]
    context = (COMPOSE.parent / lensnet["build"]["context"]).resolve()
    assert context == ROOT and (context / lensnet["build"]["dockerfile"]).is_file()
    assert lensnet["build"]["target"] in dockerfile_stages()
    assert "8000:8000" in lensnet["ports"]
    grace = float(lensnet["environment"]["LENSNET_SHUTDOWN_GRACE_S"])
    assert int(lensnet["stop_grace_period"].rstrip("s")) > grace, "Docker waits for the drain before SIGKILL"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "../prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in prometheus["volumes"]
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["rules/*.yml"], "relative to the config: /etc/prometheus/rules in the container"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "lensnet"]
    assert job["static_configs"][0]["targets"] == ["lensnet:8000"]


# --- Kubernetes ---------------------------------------------------------------------------------


def k8s_resources() -> dict[str, dict[str, Any]]:
    """Every resource of the kustomization, by kind."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_yaml_all(K8S / name):
            assert doc["kind"] not in resources, f"one {doc['kind']}"
            resources[doc["kind"]] = doc
    return resources


CORE_KINDS = (
    "Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress",
)  # fmt: skip


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}  # nothing else: every file a manifest
    assert listed == on_disk
    assert set(k8s_resources()) == {*CORE_KINDS, "ServiceMonitor", "PrometheusRule"}
    assert kustomization["namespace"] == k8s_resources()["Namespace"]["metadata"]["name"]
    (image,) = kustomization["images"]
    container = k8s_resources()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == image["name"]


@pytest.mark.parametrize("version", ["1.28.0", kubernetes_validate.utils.latest_version()])
@pytest.mark.parametrize("kind", CORE_KINDS)
def test_core_manifest_matches_the_kubernetes_schema(kind: str, version: str) -> None:
    kubernetes_validate.validate(k8s_resources()[kind], version, strict=True)


def test_every_file_in_the_manifests_folder_validates() -> None:
    """`kubernetes-validate deploy/k8s/*.yaml` passes: a Helm values file there made it exit 2."""
    result = run(tool("kubernetes-validate"), *sorted(K8S.glob("*.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr


def container() -> dict[str, Any]:
    (main,) = k8s_resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return main


def configmap_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in k8s_resources()["ConfigMap"]["data"].items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_configmap_holds_valid_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = k8s_resources()["ConfigMap"]["data"]
    fields = {f"LENSNET_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    settings = configmap_settings(monkeypatch)
    assert settings.precision == "auto" and settings.workers == 1, "one process per GPU, fp16 on CUDA"
    assert settings.device == "cuda", "a GPU pod without CUDA must not become ready on the CPU"
    assert settings.intra_op_threads == int(container()["resources"]["requests"]["cpu"])
    assert container()["envFrom"] == [{"configMapRef": {"name": k8s_resources()["ConfigMap"]["metadata"]["name"]}}]


def test_deployment_probes() -> None:
    main = container()
    (port,) = main["ports"]
    assert port["containerPort"] == 8000 and port["name"] == "http"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert main[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_deployment_requests_a_gpu_and_sizes_resources() -> None:
    resources = container()["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]
    tolerations = k8s_resources()["Deployment"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_deployment_drains_before_it_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = k8s_resources()["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert 2 <= pre_stop <= 15, "long enough for endpoint removal to propagate"
    grace = configmap_settings(monkeypatch).shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the replica count"


def test_deployment_runs_unprivileged() -> None:
    pod = k8s_resources()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (user,) = dockerfile_stages()["gpu"].args("USER")
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    context = container()["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    if context.get("readOnlyRootFilesystem"):
        assert {"name": "tmp", "mountPath": "/tmp"} in container()["volumeMounts"]


def test_service_selects_the_pods() -> None:
    resources = k8s_resources()
    service, deployment = resources["Service"], resources["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"]
    assert resources["PodDisruptionBudget"]["spec"]["selector"] == deployment["spec"]["selector"]


def adapter_rule() -> dict[str, Any]:
    (rule,) = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    return rule


def test_hpa_scales_the_deployment_on_the_adapter_metric() -> None:
    resources = k8s_resources()
    hpa, deployment = resources["HorizontalPodAutoscaler"], resources["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", rule["metricsQuery"]))


def test_service_monitor_scrapes_the_service_and_keeps_its_labels() -> None:
    resources = k8s_resources()
    monitor, service = resources["ServiceMonitor"], resources["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True, "the operator's `endpoint` target label would replace the service's"


def test_session_ingress_hashes_the_client_s_routing_header_to_the_service() -> None:
    from lensnet_client.session import ROUTING_HEADER

    ingress, service = k8s_resources()["Ingress"], k8s_resources()["Service"]
    hashed = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    assert hashed == "$http_" + ROUTING_HEADER.replace("-", "_")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1/sessions", "Prefix")
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
