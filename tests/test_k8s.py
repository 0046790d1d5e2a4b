"""deploy/k8s/single: the all-in-one Kubernetes manifests agree with the server's settings, health service and image.

No cluster and no kubectl: the YAML is parsed and checked against server/config.py (Settings and its
VITSERVE_* variables), server/__main__.py (the drain grace), the Dockerfile (USER) and a real server
(the probes' health services answer SERVING).
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.__main__ import parse_args
from server.auth import Security
from server.config import ENV_PREFIX, Settings
from server.http import create_http_server
from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s" / "single"
MANIFESTS = {"deployment.yaml", "service.yaml", "pvc.yaml"}
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def _one(name: str, kind: str) -> dict:
    docs = _load(name)
    assert [d["kind"] for d in docs] == [kind], f"{name}: expected one {kind}"
    return docs[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return _one("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def service() -> dict:
    return _one("service.yaml", "Service")


@pytest.fixture(scope="module")
def pvc() -> dict:
    return _one("pvc.yaml", "PersistentVolumeClaim")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["vitserve"]
    return containers[0]


@pytest.fixture(scope="module")
def env(container) -> dict[str, str]:
    entries = container["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    for e in entries:
        assert set(e) == {"name", "value"} and isinstance(e["value"], str), f"{e}: env values must be strings"
    return {e["name"]: e["value"] for e in entries}


@pytest.fixture(scope="module")
def settings(env) -> Settings:
    return Settings.from_env(environ=env)  # ConfigError on a value the server would refuse


@pytest.fixture(scope="module")
def ports(container) -> dict[str, int]:
    names = [p["name"] for p in container["ports"]]
    assert len(names) == len(set(names))
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_kustomization_lists_exactly_the_manifests():
    kustomization = _one("kustomization.yaml", "Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    present = {p.name for p in K8S.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert set(resources) == present == MANIFESTS


@pytest.mark.parametrize("name", sorted(MANIFESTS | {"kustomization.yaml"}))
def test_every_manifest_has_a_header_with_the_apply_command(name):
    text = (K8S / name).read_text()
    header = text[:text.index("\napiVersion:")]
    assert header.startswith("# ") and all(line.startswith("#") for line in header.splitlines())
    assert "kubectl apply -k deploy/k8s/single" in header


def test_env_vars_are_settings_fields_with_the_decided_values(env, settings):
    fields = {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}
    unknown = sorted(set(env) - set(fields))
    assert not unknown, f"not Settings fields: {unknown}"
    assert set(env) == {"VITSERVE_HOST", "VITSERVE_PORT", "VITSERVE_HTTP_PORT", "VITSERVE_METRICS_PORT", "VITSERVE_DATA_DIR",
                        "VITSERVE_LOG_JSON", "VITSERVE_CHECKPOINT_EVERY_STEPS", "VITSERVE_INTRA_OP_THREADS"}
    assert settings.host == "0.0.0.0"  # the kubelet probes the pod IP
    assert settings.port == 50051
    assert settings.metrics_port == 8002
    assert settings.http_port == 8000
    assert settings.data_dir == Path("/data")
    assert settings.log_json is True
    assert settings.checkpoint_every_steps == 100
    assert settings.intra_op_threads == 2


def test_container_ports_and_scrape_annotations_match_settings(deployment, ports, settings):
    assert ports == {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}
    assert ports == {"grpc": 50051, "http": 8000, "metrics": 8002}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.metrics_port),
                           "prometheus.io/path": "/metrics"}


def test_probes_are_grpc_health_and_v2_http_readiness(container, settings):
    for name in ("startupProbe", "livenessProbe"):
        probe = container[name]
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(probe)
        assert handlers == {"grpc"}, f"{name}: {handlers}"
        assert probe["grpc"]["port"] == settings.port == 50051, name
        assert probe["grpc"]["service"] == ""
    ready = container["readinessProbe"]
    assert {"grpc", "httpGet", "tcpSocket", "exec"} & set(ready) == {"httpGet"}
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": settings.http_port}
    assert settings.http_port == 8000
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 60  # a slow model load is not killed


def test_probes_answer_on_a_real_server(container, serve):
    services = {container[name]["grpc"].get("service", "") for name in ("startupProbe", "livenessProbe")}
    assert services == {""}
    running = serve()
    door = create_http_server(running.plane.settings.model_copy(update={"http_port": 0}), running.plane, Security())
    try:
        path = container["readinessProbe"]["httpGet"]["path"]
        with urllib.request.urlopen(f"http://127.0.0.1:{door.port}{path}", timeout=10) as answer:
            assert answer.status == 200
        with pytest.raises(urllib.error.HTTPError) as missing:  # the check can fail: a path that is not served
            urllib.request.urlopen(f"http://127.0.0.1:{door.port}/v2/health/nope", timeout=10)
        assert missing.value.code == 404
    finally:
        door.stop()
    stub = health_pb2_grpc.HealthStub(running.channel)
    for service in sorted(services):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:  # the check can fail: a service the server does not know
        stub.Check(health_pb2.HealthCheckRequest(service="vitserve.v1.Nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_service_targets_existing_container_ports(service, ports, deployment):
    spec = service["spec"]
    assert spec["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in spec["ports"]] == [
        ("grpc", 50051, "grpc"), ("http", 8000, "http"), ("metrics", 8002, "metrics")]
    for p in spec["ports"]:
        target = p["targetPort"]
        assert target in (ports if isinstance(target, str) else ports.values()), p
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()


def test_selector_matches_pod_template_labels(deployment):
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"] == {
        "app.kubernetes.io/name": "vitserve", "app.kubernetes.io/component": "server"}


def test_one_writer_to_the_data_volume(deployment, pvc, container, settings):
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    mounts = container["volumeMounts"]
    assert [(m["name"], m["mountPath"]) for m in mounts] == [("data", str(settings.data_dir))]
    assert Path(mounts[0]["mountPath"]) == settings.data_dir == Path("/data")
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] == "vitserve-data"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_security_context_matches_the_image(deployment, container):
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "no numeric USER line in the Dockerfile"
    uid, gid = int(users[-1][0]), int(users[-1][1] or users[-1][0])  # the runtime stage's USER
    assert (uid, gid) == (10001, 10001)
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_termination_grace_covers_the_drain_and_final_checkpoint(deployment):
    grace = parse_args([])["grace"]
    assert grace == 5.0
    period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert period == 30 and period > grace


def test_image_and_resources(container, settings):
    assert container["image"] == "vitserve:cpu"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                      "limits": {"cpu": "2", "memory": "512Mi"}}
    assert settings.intra_op_threads == int(container["resources"]["limits"]["cpu"])  # no oversubscription
