"""deploy/ is checked without a Docker engine or a cluster: every Kubernetes manifest (base, and
each overlay rendered) against the Kubernetes schemas of a pinned version in strict mode
(kubernetes-validate, offline), the compose file against the compose-spec schema
(check-jsonschema's vendored copy), the Dockerfile for the facts the runbook promises, and every
TUNEFORGE_* variable in compose and k8s against the Settings model, so a typo fails here instead
of being silently ignored by a running service."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tuneforge.core.nats_server import free_port
from tuneforge.core.settings import DEFAULT_PORTS, SERVICES, Settings, service_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S_VERSION = "1.31"  # the oldest Kubernetes the manifests promise to run on
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBECTL = shutil.which("kubectl")
SETTINGS_ENV = {f"TUNEFORGE_{name.upper()}" for name in Settings.model_fields}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _base_resources() -> list[dict]:
    return [d for name in _kustomization(K8S / "base")["resources"] for d in _docs(K8S / "base" / name)]


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge(target, patch):
    """A small strategic merge: maps merge key by key (null deletes), lists of named items
    (containers, env, volumes) merge by name, other lists are replaced -- enough to render the
    overlays here without kubectl."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    if (isinstance(target, list) and isinstance(patch, list)
            and all(isinstance(i, dict) and "name" in i for i in [*target, *patch])):
        out = [copy.deepcopy(i) for i in target]
        for item in patch:
            at = next((n for n, t in enumerate(out) if t["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = _merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def _render(overlay: Path) -> list[dict]:
    kustomization = _kustomization(overlay)
    assert kustomization["resources"] == ["../../base"], f"{overlay.name}: overlays build on the base"
    resources = {_key(d): d for d in _base_resources()}
    for patch in kustomization.get("patches", []):
        for doc in _docs(overlay / patch["path"]):
            assert _key(doc) in resources, f"{overlay.name}/{patch['path']} patches nothing in base: {_key(doc)}"
            resources[_key(doc)] = _merge(resources[_key(doc)], doc)
    return list(resources.values())


def _validate(doc: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: "
                    f"{'.'.join(map(str, e.path))}: {e.message}")


def _deployment(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if _key(d) == ("Deployment", name))


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# -- Kubernetes --------------------------------------------------------------------------------
def test_base_manifests_are_valid_kubernetes_objects():
    listed = set(_kustomization(K8S / "base")["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every base manifest is listed in kustomization.yaml and exists"
    docs = _base_resources()
    for doc in docs:
        _validate(doc, "base")
    for service in SERVICES:
        deployment = _deployment(docs, service)
        container = _container(deployment)
        port = DEFAULT_PORTS[service]
        assert container["args"] == [service]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{service} {probe} asks the service's gRPC port"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        service_doc = next(d for d in docs if _key(d) == ("Service", service))
        assert service_doc["spec"]["ports"][0]["port"] == port
    assert "nvidia.com/gpu" not in json.dumps(docs), "the base runs anywhere; GPUs come from overlays"


def test_validator_rejects_a_broken_manifest():
    """The schema check is real: a misspelt field fails in strict mode."""
    broken = copy.deepcopy(_deployment(_base_resources(), "notifier"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_to_valid_objects(overlay):
    docs = _render(overlay)
    for doc in docs:
        _validate(doc, overlay.name)
    trainer = _deployment(docs, "trainer")
    resources = _container(trainer)["resources"]
    selector = trainer["spec"]["template"]["spec"].get("nodeSelector", {})
    if overlay.name.startswith("gpu-"):
        assert resources["limits"]["nvidia.com/gpu"] >= 1
        assert selector.get("nvidia.com/gpu.product"), "a GPU overlay pins its GPU class"
    else:
        assert "nvidia.com/gpu" not in json.dumps(trainer) and not selector


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (the schema checks above still ran)")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_kubectl_kustomize_output_is_valid(overlay):
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        _validate(doc, f"kubectl kustomize {overlay.name}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tuneforge"
    # kustomize's real strategic merge agrees with the simple one above on what matters.
    mine = _container(_deployment(_render(overlay), "trainer"))["resources"]
    assert _container(_deployment(docs, "trainer"))["resources"] == mine


def test_nats_values_enable_a_jetstream_cluster():
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    assert values["config"]["jetstream"]["enabled"] is True
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}


# -- compose -----------------------------------------------------------------------------------
def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec(tmp_path):
    out = _check_compose(COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    assert services["trainer"]["deploy"]["replicas"] == 2
    assert "-js" in services["nats"]["command"]
    assert sorted(n for n, s in services.items() if "cluster" in s.get("profiles", [])) == ["nats-1", "nats-2", "nats-3"]
    for service in SERVICES:
        env = services[service]["environment"]
        assert env[f"TUNEFORGE_{service_key(service).upper()}_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert env["TUNEFORGE_ARTIFACT_URL"].startswith("s3://")
    # ...and the check is real: a misspelt key fails.
    compose["services"]["trainer"]["deploy"]["replica"] = compose["services"]["trainer"]["deploy"].pop("replicas")
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(compose))
    assert _check_compose(bad).returncode != 0


# -- settings names ----------------------------------------------------------------------------
def _k8s_env_names() -> set[str]:
    names = set()
    for path in K8S.rglob("*.yaml"):
        for doc in _docs(path):
            if doc.get("kind") == "ConfigMap":
                names |= set(doc["data"])
            for deployment_env in _env_lists(doc):
                names |= {e["name"] for e in deployment_env}
    return names


def _env_lists(node) -> list[list[dict]]:
    """Every container ``env:`` list anywhere in a manifest."""
    if isinstance(node, dict):
        found = [node["env"]] if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _env_lists(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_lists(v)]
    return []


def test_every_tuneforge_variable_is_a_setting():
    compose_names = set(re.findall(r"\b(TUNEFORGE_[A-Z0-9_]+)\s*:", COMPOSE.read_text()))
    k8s_names = _k8s_env_names()
    assert len(compose_names) > 10 and len(k8s_names) > 10
    unknown = {n for n in compose_names | k8s_names if n.startswith("TUNEFORGE_")} - SETTINGS_ENV
    assert not unknown, f"not settings (core/settings.py): {sorted(unknown)}"
    # Each service's database URL reaches that service (and only its own, in k8s).
    docs = _base_resources()
    for service in SERVICES:
        env = {e["name"] for e in _container(_deployment(docs, service)).get("env", [])}
        db = {n for n in env if n.endswith("_DATABASE_URL")}
        assert db == {f"TUNEFORGE_{service_key(service).upper()}_DATABASE_URL"}


# -- Dockerfile --------------------------------------------------------------------------------
def _stages() -> dict[str, str]:
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return {name: body for name, body in zip(parts[1::2], parts[2::2])}


def test_dockerfile_targets():
    stages = _stages()
    assert {"builder", "runtime", "services", "trainer"} <= set(stages)
    runtime = stages["runtime"]
    assert re.search(r"^USER\s+tuneforge\s*$", stages["services"], re.M)
    assert re.search(r"^USER\s+tuneforge\s*$", stages["trainer"], re.M)
    assert 'ENTRYPOINT ["tuneforge", "serve"]' in runtime
    assert "HEALTHCHECK" in runtime
    assert "torch" not in stages["services"] and "trainer" not in stages["services"]
    assert "torch==${TORCH_VERSION}" in stages["trainer"] and "[trainer,s3]" in stages["trainer"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".tuneforge"} <= set(ignored)


def _healthcheck_code() -> str:
    line = re.search(r'^\s*CMD (\[.*\])\s*$', _stages()["runtime"], re.M).group(1)
    argv = json.loads(line)
    assert argv[:2] == ["python", "-c"]
    return argv[2]


def test_healthcheck_reports_a_serving_grpc_server():
    """The HEALTHCHECK's own code against a real grpc.health.v1 server on loopback: it passes
    while the server is SERVING on one of the service ports and fails when nothing serves."""
    code = _healthcheck_code()
    port = free_port("127.0.0.1")
    env_base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "services")}
    # Every other service port points at a free port that nobody listens on.
    ports = {service: free_port("127.0.0.1") for service in SERVICES}
    ports["notifier"] = port
    env = {**env_base, **{f"TUNEFORGE_{service_key(s).upper()}_PORT": str(p) for s, p in ports.items()}}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        run = [sys.executable, "-c", code]
        assert subprocess.run(run, env=env, timeout=30).returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert subprocess.run(run, env=env, timeout=30).returncode == 0
    finally:
        server.stop(0)
    assert subprocess.run(run, env=env, timeout=30).returncode == 1
