"""deploy/k8s: the Kubernetes manifests agree with the server's settings, health service and image.

Two layouts: deploy/k8s/single (one all-in-one pod on a ReadWriteOnce volume) and deploy/k8s (the fleet:
a trainer, autoscaled predict replicas and a shared ReadWriteMany model repository, plus the optional
MPIJob and Triton files). No cluster and no kubectl: the YAML is parsed and checked against
server/config.py (Settings, its VITSERVE_* variables and the flags of server/__main__.py), the drain grace,
the Dockerfile (USER, the venv and model paths) and a real server (the probes' health services answer).
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.__main__ import parse_args
from server.auth import Security
from server.config import ENV_PREFIX, Settings
from server.http import create_http_server
from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"
SINGLE = K8S / "single"
MANIFESTS = {"deployment.yaml", "service.yaml", "pvc.yaml"}          # single/
FLEET = ["repository.yaml", "trainer.yaml", "inference.yaml"]        # deploy/k8s's kustomization, in order
OPTIONAL = {"mpijob.yaml", "triton.yaml"}                            # deploy/k8s, applied on their own
KINDS = {  # every manifest: its objects' (apiVersion, kind), in order
    SINGLE / "pvc.yaml": [("v1", "PersistentVolumeClaim")],
    SINGLE / "deployment.yaml": [("apps/v1", "Deployment")],
    SINGLE / "service.yaml": [("v1", "Service")],
    K8S / "repository.yaml": [("v1", "PersistentVolumeClaim")],
    K8S / "trainer.yaml": [("apps/v1", "StatefulSet"), ("v1", "Service")],
    K8S / "inference.yaml": [("apps/v1", "Deployment"), ("v1", "Service"),
                             ("autoscaling/v2", "HorizontalPodAutoscaler")],
    K8S / "triton.yaml": [("apps/v1", "Deployment"), ("v1", "Service")],
    K8S / "mpijob.yaml": [("kubeflow.org/v2beta1", "MPIJob"), ("v1", "PersistentVolumeClaim")],
}
PROBE_HANDLERS = {"grpc", "httpGet", "tcpSocket", "exec"}
VITSERVE_PORTS = {"grpc": 50051, "http": 8000, "metrics": 8002}
REPOSITORY_CLAIM = "vitserve-repository"
MPI_PYTHON = "/opt/venv/bin/python"
# besides -n; --with-ft ulfm because engine/train/parallel.py refuses a job without Open MPI's fault tolerance
MPIRUN_OPTIONS = ["--with-ft", "ulfm", "--bind-to", "none", "-x", "PYTHONUNBUFFERED=1"]


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects(path: Path) -> list[dict]:
    docs = _load(path)
    assert [(d["apiVersion"], d["kind"]) for d in docs] == KINDS[path], path.name
    return docs


def _one(path: Path, kind: str) -> dict:
    docs = _load(path)
    assert [d["kind"] for d in docs] == [kind], f"{path.name}: expected one {kind}"
    return docs[0]


def _only_container(pod_spec: dict, name: str) -> dict:
    containers = pod_spec["containers"]
    assert [c["name"] for c in containers] == [name]
    assert "initContainers" not in pod_spec
    return containers[0]


def _env(container: dict) -> dict[str, str]:
    entries = container.get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    for e in entries:
        assert set(e) == {"name", "value"} and isinstance(e["value"], str), f"{e}: env values must be strings"
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(set(names) - fields)
    assert not unknown, f"not Settings fields: {unknown}"
    return {e["name"]: e["value"] for e in entries}


def _server_settings(flags: list[str], environ: dict[str, str]) -> Settings:
    """What `python -m server FLAGS` builds in `environ`, as server.__main__.main does: an unknown flag or a
    bad choice exits (argparse), a value that does not validate raises ConfigError."""
    assert all(isinstance(f, str) for f in flags), flags
    args = parse_args(flags)
    args.pop("grace")
    return Settings.from_env(environ, **args)


def _container_settings(container: dict) -> Settings:
    """A vitserve container: the image's entrypoint is the server, its args are server flags."""
    assert "command" not in container, "the image's entrypoint is the server; args are its flags"
    return _server_settings(container.get("args", []), _env(container))


def _ports(container: dict) -> dict[str, int]:
    names = [p["name"] for p in container["ports"]]
    assert len(names) == len(set(names))
    assert all(p["protocol"] == "TCP" for p in container["ports"])
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _volumes(pod_spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec["volumes"]}


def _mounts(container: dict) -> dict[str, dict]:
    mounts = container["volumeMounts"]
    assert len({m["mountPath"] for m in mounts}) == len(mounts)
    return {m["name"]: m for m in mounts}


def _image_user() -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "no numeric USER line in the Dockerfile"
    uid, gid = int(users[-1][0]), int(users[-1][1] or users[-1][0])  # the runtime stage's USER
    assert (uid, gid) == (10001, 10001)
    return uid, gid


def _triton_args(container: dict) -> dict[str, str]:
    args = container["args"]
    assert all(re.fullmatch(r"--[a-z-]+=\S+", a) for a in args), args
    parsed = dict(a[2:].split("=", 1) for a in args)
    assert len(parsed) == len(args)
    return parsed


def _mpirun(launcher: dict) -> tuple[int, list[str]]:
    """The launcher's `mpirun -n W [options] /opt/venv/bin/python -m server FLAGS`: W and FLAGS."""
    words = [*launcher["command"], *launcher["args"]]
    assert all(isinstance(w, str) for w in words), words
    assert words[0] == "mpirun"
    start = words.index(MPI_PYTHON)
    options, program, flags = words[1:start], words[start:start + 3], words[start + 3:]
    assert program == [MPI_PYTHON, "-m", "server"]
    assert options.count("-n") == 1 and "-np" not in options
    at = options.index("-n")
    ranks = int(options[at + 1])
    assert options[:at] + options[at + 2:] == MPIRUN_OPTIONS
    return ranks, flags


# ---------------------------------------------------------------- fixtures: deploy/k8s/single

@pytest.fixture(scope="module")
def deployment() -> dict:
    return _one(SINGLE / "deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def service() -> dict:
    return _one(SINGLE / "service.yaml", "Service")


@pytest.fixture(scope="module")
def pvc() -> dict:
    return _one(SINGLE / "pvc.yaml", "PersistentVolumeClaim")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    return _only_container(deployment["spec"]["template"]["spec"], "vitserve")


@pytest.fixture(scope="module")
def env(container) -> dict[str, str]:
    return _env(container)


@pytest.fixture(scope="module")
def settings(container) -> Settings:
    return _container_settings(container)  # ConfigError on a value the server would refuse


@pytest.fixture(scope="module")
def ports(container) -> dict[str, int]:
    return _ports(container)


# ---------------------------------------------------------------- fixtures: the fleet (deploy/k8s)

@pytest.fixture(scope="module")
def repository() -> dict:
    (claim,) = _objects(K8S / "repository.yaml")
    return claim


@pytest.fixture(scope="module")
def trainer_objects() -> list[dict]:
    return _objects(K8S / "trainer.yaml")


@pytest.fixture(scope="module")
def trainer_set(trainer_objects) -> dict:
    return trainer_objects[0]


@pytest.fixture(scope="module")
def trainer_container(trainer_set) -> dict:
    return _only_container(trainer_set["spec"]["template"]["spec"], "vitserve")


@pytest.fixture(scope="module")
def trainer_settings(trainer_container) -> Settings:
    return _container_settings(trainer_container)


@pytest.fixture(scope="module")
def inference_objects() -> list[dict]:
    return _objects(K8S / "inference.yaml")


@pytest.fixture(scope="module")
def inference(inference_objects) -> dict:
    return inference_objects[0]


@pytest.fixture(scope="module")
def inference_container(inference) -> dict:
    return _only_container(inference["spec"]["template"]["spec"], "vitserve")


@pytest.fixture(scope="module")
def inference_settings(inference_container) -> Settings:
    return _container_settings(inference_container)


@pytest.fixture(scope="module")
def triton_objects() -> list[dict]:
    return _objects(K8S / "triton.yaml")


@pytest.fixture(scope="module")
def triton(triton_objects) -> dict:
    return triton_objects[0]


@pytest.fixture(scope="module")
def triton_container(triton) -> dict:
    return _only_container(triton["spec"]["template"]["spec"], "triton")


@pytest.fixture(scope="module")
def mpi_objects() -> list[dict]:
    return _objects(K8S / "mpijob.yaml")


@pytest.fixture(scope="module")
def mpijob(mpi_objects) -> dict:
    return mpi_objects[0]


@pytest.fixture(scope="module")
def launcher(mpijob) -> dict:
    return _only_container(mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"], "mpi-launcher")


@pytest.fixture(scope="module")
def worker(mpijob) -> dict:
    return _only_container(mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"], "mpi-worker")


@pytest.fixture(scope="module")
def mpi_settings(launcher) -> Settings:
    _, flags = _mpirun(launcher)
    return _server_settings(flags, {})  # ssh passes no environment to the ranks: the flags are all they get


def _pod_specs(request) -> dict[str, dict]:
    """Every pod template of both layouts, by a short name."""
    mpi = request.getfixturevalue("mpijob")["spec"]["mpiReplicaSpecs"]
    return {
        "single": request.getfixturevalue("deployment")["spec"]["template"]["spec"],
        "trainer": request.getfixturevalue("trainer_set")["spec"]["template"]["spec"],
        "inference": request.getfixturevalue("inference")["spec"]["template"]["spec"],
        "triton": request.getfixturevalue("triton")["spec"]["template"]["spec"],
        "mpi-launcher": mpi["Launcher"]["template"]["spec"],
        "mpi-worker": mpi["Worker"]["template"]["spec"],
    }


# ---------------------------------------------------------------- both layouts: files, kustomizations, headers

def test_kustomization_lists_exactly_the_manifests():
    kustomization = _one(SINGLE / "kustomization.yaml", "Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    present = {p.name for p in SINGLE.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert set(resources) == present == MANIFESTS


def test_fleet_kustomization_lists_the_fleet_and_leaves_out_the_optional_files():
    kustomization = _one(K8S / "kustomization.yaml", "Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert set(kustomization) == {"apiVersion", "kind", "resources"}
    assert kustomization["resources"] == FLEET  # the claim first, then its writer, then its readers
    present = {p.name for p in K8S.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert present == set(FLEET) | OPTIONAL
    assert {p.name for p in K8S.iterdir() if p.is_dir()} == {"single"}
    header = (K8S / "kustomization.yaml").read_text()
    for name in sorted(OPTIONAL):  # the header tells how to apply what it leaves out
        assert f"kubectl apply -f deploy/k8s/{name}" in header
    assert "kubectl apply -k deploy/k8s/single" in header


@pytest.mark.parametrize("path", sorted(KINDS), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_parses_into_its_objects(path):
    objects = _objects(path)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names))
    for o in objects:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "vitserve", o["metadata"]["name"]
        assert set(labels) == {"app.kubernetes.io/name", "app.kubernetes.io/component"}
        assert "namespace" not in o["metadata"]  # kubectl -n / kustomize choose it


def test_object_names_are_unique_across_both_layouts():
    """The single pod and the fleet can share a namespace: nothing of one overwrites the other."""
    names = [(o["kind"], o["metadata"]["name"]) for path in KINDS for o in _load(path)]
    assert len(names) == len(set(names)), names


def _apply_command(path: Path) -> str:
    if path.parent == SINGLE:
        return "kubectl apply -k deploy/k8s/single"
    if path.name in OPTIONAL:
        return f"kubectl apply -f deploy/k8s/{path.name}"
    return "kubectl apply -k deploy/k8s"


@pytest.mark.parametrize("path", sorted([*KINDS, SINGLE / "kustomization.yaml", K8S / "kustomization.yaml"]),
                         ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_has_a_header_with_the_apply_command(path):
    text = path.read_text()
    header = text[:text.index("\napiVersion:")]
    assert header.startswith("# ") and all(line.startswith("#") for line in header.splitlines())
    command = _apply_command(path)
    assert re.search(re.escape(command) + r"(?![\w/.-])", header), f"{path.name}: no `{command}`"


# ---------------------------------------------------------------- deploy/k8s/single

def test_env_vars_are_settings_fields_with_the_decided_values(env, settings, container):
    assert set(env) == {"VITSERVE_HOST", "VITSERVE_PORT", "VITSERVE_HTTP_PORT", "VITSERVE_METRICS_PORT", "VITSERVE_DATA_DIR",
                        "VITSERVE_LOG_JSON", "VITSERVE_CHECKPOINT_EVERY_STEPS", "VITSERVE_INTRA_OP_THREADS"}
    assert "args" not in container
    assert settings.role == "all"  # trains and serves
    assert settings.model_repository == ""
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
    assert ports == VITSERVE_PORTS
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.metrics_port),
                           "prometheus.io/path": "/metrics"}


def _check_vitserve_probes(container: dict, settings: Settings):
    """Startup and liveness on the gRPC health service at the gRPC port, readiness on v2 HTTP at the HTTP port."""
    for name in ("startupProbe", "livenessProbe"):
        probe = container[name]
        handlers = PROBE_HANDLERS & set(probe)
        assert handlers == {"grpc"}, f"{name}: {handlers}"
        assert probe["grpc"] == {"port": settings.port, "service": ""}, name
        assert settings.port == _ports(container)["grpc"] == 50051
    ready = container["readinessProbe"]
    assert PROBE_HANDLERS & set(ready) == {"httpGet"}
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": settings.http_port}
    assert settings.http_port == _ports(container)["http"] == 8000
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 60  # a slow model load is not killed


def test_probes_are_grpc_health_and_v2_http_readiness(container, settings):
    _check_vitserve_probes(container, settings)


def test_probes_answer_on_a_real_server(request, serve):
    containers = [request.getfixturevalue(name) for name in ("container", "trainer_container", "inference_container")]
    services = {c[name]["grpc"].get("service", "") for c in containers for name in ("startupProbe", "livenessProbe")}
    paths = {c["readinessProbe"]["httpGet"]["path"] for c in containers}
    assert services == {""} and paths == {"/v2/health/ready"}
    running = serve()
    door = create_http_server(running.plane.settings.model_copy(update={"http_port": 0}), running.plane, Security())
    try:
        for path in sorted(paths):
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


def _check_service(service: dict, workload: dict, expected: list[tuple[str, int]]):
    """A ClusterIP Service whose ports are `expected` (name, port), each aimed at the container port of
    that name and number, selecting the workload's pods and no other pod template of either layout."""
    spec = service["spec"]
    assert spec["type"] == "ClusterIP"
    pod = workload["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = _ports(container)
    assert [(p["name"], p["port"], p["targetPort"]) for p in spec["ports"]] == [(n, p, n) for n, p in expected]
    for p in spec["ports"]:
        assert ports[p["targetPort"]] == p["port"], p  # a port number is the same inside and out
        assert p["protocol"] == "TCP"
    assert spec["selector"].items() <= pod["metadata"]["labels"].items()
    others = [o["spec"]["template"]["metadata"]["labels"] for path in KINDS for o in _load(path)
              if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] != workload["metadata"]["name"]]
    assert others and not any(spec["selector"].items() <= labels.items() for labels in others)


def test_service_targets_existing_container_ports(service, deployment):
    _check_service(service, deployment, [("grpc", 50051), ("http", 8000), ("metrics", 8002)])


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
    volumes = _volumes(spec["template"]["spec"])
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] == "vitserve-data"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_termination_grace_covers_the_drain_and_final_checkpoint(deployment, trainer_set):
    grace = parse_args([])["grace"]
    assert grace == 5.0
    for workload in (deployment, trainer_set):
        period = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period == 30 and period > grace, workload["metadata"]["name"]


def test_image_and_resources(container, settings):
    assert container["image"] == "vitserve:cpu"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                      "limits": {"cpu": "2", "memory": "512Mi"}}
    assert settings.intra_op_threads == int(container["resources"]["limits"]["cpu"])  # no oversubscription


# ---------------------------------------------------------------- both layouts: the image's user

# pod -> (fsGroup expected: the pod writes a volume, readOnlyRootFilesystem)
VITSERVE_PODS = {"single": (True, True), "trainer": (True, True), "inference": (False, True),
                 "mpi-launcher": (False, False), "mpi-worker": (True, False)}


@pytest.mark.parametrize("name", sorted(VITSERVE_PODS))
def test_security_context_matches_the_image(request, name):
    uid, gid = _image_user()
    writes, read_only_root = VITSERVE_PODS[name]
    spec = _pod_specs(request)[name]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    if writes:
        assert (pod["fsGroup"], pod["fsGroupChangePolicy"]) == (gid, "OnRootMismatch")
    else:  # a reader must not chown the shared repository
        assert "fsGroup" not in pod and "fsGroupChangePolicy" not in pod
    assert "supplementalGroups" not in pod
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("readOnlyRootFilesystem", False) is read_only_root
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not {"runAsUser", "runAsGroup", "privileged"} & set(sc)  # the pod's user holds


def test_triton_reads_the_trainers_files_without_chowning_them(triton):
    _, gid = _image_user()
    pod = triton["spec"]["template"]["spec"]["securityContext"]
    assert pod == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,  # the image's triton-server user
                   "supplementalGroups": [gid], "seccompProfile": {"type": "RuntimeDefault"}}
    sc = triton["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc == {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


# ---------------------------------------------------------------- the fleet: settings and roles

def test_trainer_env_and_args_are_settings_with_the_decided_values(trainer_container, trainer_settings):
    assert trainer_container["args"] == ["--role", "train"]
    assert set(_env(trainer_container)) == {
        "VITSERVE_HOST", "VITSERVE_PORT", "VITSERVE_HTTP_PORT", "VITSERVE_METRICS_PORT", "VITSERVE_DATA_DIR",
        "VITSERVE_MODEL_REPOSITORY", "VITSERVE_LOG_JSON", "VITSERVE_CHECKPOINT_EVERY_STEPS", "VITSERVE_INTRA_OP_THREADS"}
    s = trainer_settings
    assert s.role == "train"
    assert (s.host, s.port, s.http_port, s.metrics_port) == ("0.0.0.0", 50051, 8000, 8002)
    assert s.data_dir == Path("/data")
    assert s.model_repository == "/repository"
    assert s.log_json is True
    assert s.checkpoint_every_steps == 100
    assert s.publish_every_steps == 0  # versions reach the fleet by Publish only
    assert s.data_parallel is False
    assert s.intra_op_threads == 2


def test_inference_env_and_args_are_settings_with_the_decided_values(inference_container, inference_settings):
    assert inference_container["args"] == ["--role", "predict"]
    assert set(_env(inference_container)) == {
        "VITSERVE_HOST", "VITSERVE_PORT", "VITSERVE_HTTP_PORT", "VITSERVE_METRICS_PORT", "VITSERVE_MODEL_REPOSITORY",
        "VITSERVE_REPOSITORY_POLL_SECONDS", "VITSERVE_LOG_JSON", "VITSERVE_INTRA_OP_THREADS"}
    s = inference_settings
    assert s.role == "predict"
    assert (s.host, s.port, s.http_port, s.metrics_port) == ("0.0.0.0", 50051, 8000, 8002)
    assert s.model_repository == "/repository"
    assert s.repository_poll_seconds == 10.0
    assert s.log_json is True
    assert s.checkpoint_every_steps == 0 and s.publish_every_steps == 0  # nothing to write
    assert s.intra_op_threads == 2


def test_roles(trainer_settings, inference_settings, mpi_settings, settings):
    assert (settings.role, trainer_settings.role, inference_settings.role, mpi_settings.role) == (
        "all", "train", "predict", "train")
    assert (settings.data_parallel, trainer_settings.data_parallel, mpi_settings.data_parallel) == (False, False, True)


@pytest.mark.parametrize("name", ["trainer", "inference"])
def test_fleet_ports_probes_and_annotations_match_settings(request, name):
    workload = request.getfixturevalue({"trainer": "trainer_set"}.get(name, name))
    container = request.getfixturevalue(f"{name}_container")
    s = request.getfixturevalue(f"{name}_settings")
    assert _ports(container) == {"grpc": s.port, "http": s.http_port, "metrics": s.metrics_port} == VITSERVE_PORTS
    _check_vitserve_probes(container, s)
    assert workload["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(s.metrics_port), "prometheus.io/path": "/metrics"}
    assert container["image"] == "vitserve:cpu" and container["imagePullPolicy"] == "IfNotPresent"
    assert s.intra_op_threads == int(container["resources"]["limits"]["cpu"])  # no oversubscription


def test_fleet_services_target_their_pods(trainer_set, trainer_objects, inference, inference_objects, triton, triton_objects):
    vitserve = [("grpc", 50051), ("http", 8000), ("metrics", 8002)]
    _check_service(trainer_objects[1], trainer_set, vitserve)
    _check_service(inference_objects[1], inference, vitserve)
    _check_service(triton_objects[1], triton, [("http", 8000), ("grpc", 8001), ("metrics", 8002)])
    assert trainer_set["spec"]["serviceName"] == trainer_objects[1]["metadata"]["name"] == "vitserve-trainer"
    assert inference_objects[1]["metadata"]["name"] == "vitserve-inference"
    for workload in (trainer_set, inference, triton):
        spec = workload["spec"]
        assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]


# ---------------------------------------------------------------- the fleet: the trainer

def test_trainer_is_the_one_writer(trainer_set, trainer_container, trainer_settings):
    spec = trainer_set["spec"]
    assert spec["replicas"] == 1
    assert spec["podManagementPolicy"] == "OrderedReady"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}  # one pod: the old one stops first
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (template,) = spec["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "data"
    assert template["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    mounts = _mounts(trainer_container)
    assert set(mounts) == {"data", "repository"}
    assert PurePosixPath(mounts["data"]["mountPath"]) == PurePosixPath(trainer_settings.data_dir)
    assert "data" not in _volumes(spec["template"]["spec"])  # the claim template provides it
    data, repo = PurePosixPath(trainer_settings.data_dir), PurePosixPath(trainer_settings.model_repository)
    assert not (data.is_relative_to(repo) or repo.is_relative_to(data))  # checkpoints stay out of the repository


# ---------------------------------------------------------------- the fleet: the shared repository

def _repository_consumers(request) -> dict[str, tuple[dict, dict, str, bool]]:
    """name -> (pod spec, container, the repository path its settings or args name, read-only)."""
    pods = _pod_specs(request)
    worker = request.getfixturevalue("worker")
    triton = _triton_args(request.getfixturevalue("triton_container"))
    return {
        "trainer": (pods["trainer"], request.getfixturevalue("trainer_container"),
                    request.getfixturevalue("trainer_settings").model_repository, False),
        "inference": (pods["inference"], request.getfixturevalue("inference_container"),
                      request.getfixturevalue("inference_settings").model_repository, True),
        "mpi-worker": (pods["mpi-worker"], worker, request.getfixturevalue("mpi_settings").model_repository, False),
        "triton": (pods["triton"], request.getfixturevalue("triton_container"), triton["model-repository"], True),
    }


def test_repository_is_one_read_write_many_claim(repository):
    assert repository["metadata"]["name"] == REPOSITORY_CLAIM
    assert repository["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "5Gi"}}}


@pytest.mark.parametrize("name", ["trainer", "inference", "mpi-worker", "triton"])
def test_repository_is_the_same_claim_mounted_where_the_settings_say(request, repository, name):
    pod, container, path, read_only = _repository_consumers(request)[name]
    claims = {n: v["persistentVolumeClaim"] for n, v in _volumes(pod).items()}
    repo = [n for n, c in claims.items() if c["claimName"] == repository["metadata"]["name"]]
    assert repo == ["repository"], claims
    mount = _mounts(container)["repository"]
    assert mount["mountPath"] == path == "/repository"
    assert mount.get("readOnly", False) is read_only
    assert claims["repository"].get("readOnly", False) is read_only  # readers cannot write even through the claim
    assert "subPath" not in mount


def test_only_writers_mount_the_repository_read_write(request):
    writers = {name for name, (*_, read_only) in _repository_consumers(request).items() if not read_only}
    assert writers == {"trainer", "mpi-worker"}  # alternatives: mpijob.yaml's header scales the trainer to 0


# ---------------------------------------------------------------- the fleet: inference replicas and their autoscaler

def test_inference_rolls_without_losing_capacity(inference, inference_container):
    spec = inference["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert spec["replicas"] == 2
    assert set(_mounts(inference_container)) == {"repository"}  # no data volume: a replica writes nothing
    grace = parse_args([])["grace"]
    assert inference_container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    period = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert period == 15 and 5 + grace < period  # out of the endpoints, then the drain, before SIGKILL


def test_hpa_scales_the_inference_deployment_on_cpu(inference_objects, inference, inference_container):
    hpa = inference_objects[2]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": inference["apiVersion"], "kind": inference["kind"],
                                      "name": inference["metadata"]["name"]}
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vitserve-inference"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    assert spec["minReplicas"] == inference["spec"]["replicas"]
    assert spec["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    resources = inference_container["resources"]  # utilisation is relative to the request
    assert resources == {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}}


# ---------------------------------------------------------------- the MPIJob

def test_mpijob_launches_w_ranks_of_the_data_parallel_server(mpijob, launcher, mpi_settings):
    spec = mpijob["spec"]
    assert (spec["slotsPerWorker"], spec["mpiImplementation"]) == (1, "OpenMPI")
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running"}
    replicas = spec["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"} and replicas["Launcher"]["replicas"] == 1
    ranks, flags = _mpirun(launcher)
    assert ranks == replicas["Worker"]["replicas"] * spec["slotsPerWorker"] == 2
    assert "--data-parallel" in flags
    s = mpi_settings
    assert s.data_parallel is True and s.role == "train"
    assert (s.host, s.port, s.http_port, s.metrics_port) == ("0.0.0.0", 50051, 8000, 8002)
    assert s.data_dir == Path("/data") and s.model_repository == "/repository"
    assert (s.checkpoint_every_steps, s.checksum_every_steps, s.log_json) == (100, 10, True)
    assert s.intra_op_threads == 2
    assert launcher["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                     "limits": {"cpu": "500m", "memory": "256Mi"}}


def test_mpijob_ranks_find_the_server_and_the_model_where_the_image_has_them(mpi_settings):
    dockerfile = (REPO / "Dockerfile").read_text()
    models = re.findall(r"^ARG MODEL=(\S+)\s*$", dockerfile, re.MULTILINE)
    assert models and set(models) == {"digits"}
    assert "VITSERVE_ARTIFACTS=/models/${MODEL}" in dockerfile
    assert mpi_settings.artifacts == Path("/models") / models[-1]  # the image's variable does not reach the ranks
    assert "ENV PATH=/opt/venv/bin:$PATH" in dockerfile and MPI_PYTHON.startswith("/opt/venv/bin/")


def test_mpijob_settings_are_flags_only(launcher, worker):
    for container in (launcher, worker):  # ssh passes no environment to the ranks
        assert not [e for e in container.get("env", []) if e["name"].startswith(ENV_PREFIX)], container["name"]


def test_mpijob_workers_run_sshd_and_rank_0_serves(mpijob, worker, mpi_settings, mpi_objects):
    spec = mpijob["spec"]
    assert worker["command"] == ["/usr/sbin/sshd"]
    home = PurePosixPath(spec["sshAuthMountPath"]).parent
    assert spec["sshAuthMountPath"] == "/home/vitserve/.ssh"
    assert worker["args"] == ["-De", "-f", str(home / ".sshd_config")]
    ports = _ports(worker)
    s = mpi_settings
    assert ports == {"ssh": 2222, "grpc": s.port, "http": s.http_port, "metrics": s.metrics_port}
    assert PROBE_HANDLERS & set(worker["readinessProbe"]) == {"tcpSocket"}
    assert worker["readinessProbe"]["tcpSocket"] == {"port": ports["ssh"]}
    assert "livenessProbe" not in worker and "startupProbe" not in worker  # only rank 0 serves
    assert worker["image"] == _only_container(
        spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"], "mpi-launcher")["image"] == "vitserve:mpi"
    assert s.intra_op_threads == int(worker["resources"]["limits"]["cpu"])
    mounts = _mounts(worker)
    assert set(mounts) == {"data", "repository"}
    assert PurePosixPath(mounts["data"]["mountPath"]) == PurePosixPath(s.data_dir)
    data = _volumes(spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"])["data"]["persistentVolumeClaim"]
    claim = mpi_objects[1]
    assert data == {"claimName": claim["metadata"]["name"]} and claim["metadata"]["name"] == "vitserve-mpi-data"
    # every worker pod mounts it (one template), so ReadWriteMany although only rank 0 writes
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}


# ---------------------------------------------------------------- Triton

def test_triton_serves_the_repository_in_poll_mode_like_the_replicas(triton, triton_container, inference_settings):
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", triton_container["image"])
    assert triton_container["command"] == ["tritonserver"]
    args = _triton_args(triton_container)
    assert set(args) == {"model-repository", "model-control-mode", "repository-poll-secs",
                         "http-port", "grpc-port", "metrics-port"}
    assert args["model-repository"] == _mounts(triton_container)["repository"]["mountPath"] == "/repository"
    assert args["model-control-mode"] == "poll"
    poll = inference_settings.repository_poll_seconds
    assert poll == int(poll) and args["repository-poll-secs"] == str(int(poll)) == "10"  # Triton takes whole seconds
    ports = _ports(triton_container)
    assert ports == {"http": int(args["http-port"]), "grpc": int(args["grpc-port"]),
                     "metrics": int(args["metrics-port"])} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": args["metrics-port"], "prometheus.io/path": "/metrics"}
    assert not _env(triton_container)


def test_triton_probes_are_its_v2_health_endpoints(triton, triton_container):
    http = _ports(triton_container)["http"]
    expected = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                "readinessProbe": "/v2/health/ready"}
    for name, path in expected.items():
        probe = triton_container[name]
        assert PROBE_HANDLERS & set(probe) == {"httpGet"}, name
        assert probe["httpGet"] == {"path": path, "port": http}, name
    assert triton["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert set(_mounts(triton_container)) == {"repository"}
    assert triton_container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"},
                                             "limits": {"cpu": "2", "memory": "2Gi"}}
