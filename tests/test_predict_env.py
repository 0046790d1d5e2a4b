"""An inference replica on the maintained ONNX Runtime: `make predict-env` (Python 3.13, plain onnxruntime 1.31,
requirements/predict.txt) serves `--role predict`, and its logits equal the training build's on the same artifacts.

The environment is the Makefile's own target, built into .cache/predict-env-<hash> (git-ignored; the hash is
of requirements/predict.txt and pyproject.toml, so a changed lock gets a new environment and the old one is
removed). A cached environment costs a few seconds; a fresh machine pays the install (about a minute with a
cold pip cache). CI reaches PyPI: a failed install fails the test, it never skips.

Both servers are real `python -m server` processes on 127.0.0.1 started from the repository root (so both run
this checkout's code; only the interpreter and its site-packages differ), asked the same batch through
Predict (client.ViTClient) and KServe v2 ModelInfer (tritonclient.grpc).

The predict image (Dockerfile, --build-arg ROLE=predict) cannot be built here (no container engine; the image
test, tests/docker/run.sh, builds the default one): its install step runs under sh with a stub Python to show
which lock each role installs, and the rest is checked for consistency (ARGs, VITSERVE_ROLE, the build context,
make docker-predict).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import re
import subprocess
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from client.client import ViTClient
from server.config import Settings
from tests.helpers import MODEL, REPO, START_TIMEOUT, assert_one_error_line, batch, clean_env, ok, start_server

CACHE = REPO / ".cache"
KEYED_BY = ("requirements/predict.txt", "pyproject.toml")
INSTALL_TIMEOUT = 600.0  # seconds for `make predict-env` (measured: ~40 s with a warm pip cache)
PYTHON = (3, 13)
ORT_SERIES = "1.31."
ATOL, RTOL = 1e-5, 1e-5


def env_key() -> str:
    digest = hashlib.sha256()
    for name in KEYED_BY:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def venv_env(**extra: str) -> dict[str, str]:
    """clean_env() without what could make the predict venv's Python see another environment's packages."""
    env = clean_env(**extra)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def predict_python() -> Path:
    """The Python of a `make predict-env` environment for this lock, built on first use and reused after."""
    CACHE.mkdir(exist_ok=True)
    venv = CACHE / f"predict-env-{env_key()}"
    with open(CACHE / "predict-env.lock", "w") as lock:  # one builder at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in CACHE.glob("predict-env-*"):
            if old != venv and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)  # environments of older locks: ~300 MB each
        t0 = time.monotonic()
        result = subprocess.run(["make", "--no-print-directory", "predict-env", f"PREDICT_VENV={venv}"], cwd=REPO,
                                env=venv_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        took = time.monotonic() - t0
    if result.returncode != 0:
        pytest.fail(f"`make predict-env PREDICT_VENV={venv}` failed (exit {result.returncode}) after {took:.0f}s; it "
                    f"needs python3.13 (or pyenv's 3.13) and PyPI. Its output:\n{(result.stdout + result.stderr)[-4000:]}")
    print(f"\nmake predict-env ({'cached' if 'pip install' not in result.stdout else 'installed'}): {took:.1f}s")
    return venv / "bin/python"


def in_venv(python: Path, code: str) -> str:
    return ok(subprocess.run([str(python), "-c", code], cwd=REPO, env=venv_env(), capture_output=True, text=True,
                             timeout=START_TIMEOUT)).stdout


def test_the_predict_env_is_python_3_13_on_plain_onnxruntime_1_31(predict_python):
    """The premise of the other tests: that environment has the maintained ONNX Runtime and no training parts."""
    facts = json.loads(in_venv(predict_python, (
        "import json, sys, importlib.metadata as m, importlib.util as u, onnxruntime\n"
        "from onnxruntime.capi import _pybind_state as C\n"
        "names = sorted(d.metadata['Name'].lower() for d in m.distributions())\n"
        "print(json.dumps({'python': sys.version_info[:2], 'ort': onnxruntime.__version__,\n"
        "    'ort_file': onnxruntime.__file__, 'runtimes': [n for n in names if n.startswith('onnxruntime')],\n"
        "    'training_module': u.find_spec('onnxruntime.training') is not None,\n"
        "    'training_classes': [c for c in ('Module', 'Optimizer', 'load_checkpoint') if hasattr(C, c)],\n"
        "    'torch': u.find_spec('torch') is not None}))")))
    assert tuple(facts["python"]) == PYTHON, f"the predict env runs Python {facts['python']}, not 3.13"
    assert facts["ort"].startswith(ORT_SERIES), facts["ort"]
    assert Path(facts["ort_file"]).is_relative_to(predict_python.parents[1]), facts["ort_file"]
    assert facts["runtimes"] == ["onnxruntime"], facts["runtimes"]
    assert not facts["training_module"] and facts["training_classes"] == [], facts
    assert not facts["torch"]


def onnxruntime_loaded_by(pid: int) -> set[str]:
    """The site-packages folders whose onnxruntime native library the process has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1].split("/onnxruntime/")[0] for line in maps
            if "/onnxruntime/capi/" in line and line.rstrip().endswith(".so")}


def logits_of(address: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(Predict's logits, ModelInfer's logits, the execution providers) from one server."""
    with ViTClient(address, timeout=60) as client:
        predicted = client.predict(images, top_k=1, return_logits=True).logits
        providers = client.model_info().execution_providers
    kserve = triton.InferenceServerClient(address)
    try:
        assert kserve.is_model_ready(MODEL)
        request = triton.InferInput("images", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        inferred = kserve.infer(MODEL, [request]).as_numpy("logits")
    finally:
        kserve.close()
    return predicted, inferred, providers


def test_predict_replica_on_onnxruntime_1_31_gives_the_training_builds_logits(predict_python, exported, tmp_path):
    images, _ = batch(16, seed=7)
    flags = ("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--http-port", "-1")
    replica = start_server(*flags, "--role", "predict", command=[str(predict_python), "-m", "server"],
                           env=venv_env(VITSERVE_DATA_DIR=str(tmp_path / "replica")))
    try:
        trainer = start_server(*flags, env=clean_env(VITSERVE_DATA_DIR=str(tmp_path / "trainer")))
        try:
            # Each process runs its own environment's ONNX Runtime (not the other's, not a stray one).
            assert onnxruntime_loaded_by(replica.proc.pid) == {str(next(predict_python.parents[1].glob(
                "lib/python3.13/site-packages")))}, onnxruntime_loaded_by(replica.proc.pid)
            assert not onnxruntime_loaded_by(trainer.proc.pid) & onnxruntime_loaded_by(replica.proc.pid)
            new_predict, new_infer, new_providers = logits_of(replica.address, images)
            old_predict, old_infer, old_providers = logits_of(trainer.address, images)
        finally:
            trainer.stop()
    finally:
        replica.stop()
    assert new_providers == old_providers == ["CPUExecutionProvider"]
    for name, logits in (("Predict, onnxruntime 1.31", new_predict), ("ModelInfer, onnxruntime 1.31", new_infer),
                         ("ModelInfer, onnxruntime-training 1.19.2", old_infer)):
        assert logits.shape == old_predict.shape == (16, 10) and logits.dtype == np.float32, (name, logits.shape)
        np.testing.assert_allclose(logits, old_predict, rtol=RTOL, atol=ATOL, err_msg=name)
    assert np.array_equal(new_predict, new_infer), "one server's Predict and ModelInfer disagree"
    assert np.array_equal(new_predict.argmax(1), old_predict.argmax(1))
    print(f"\nmax |logit difference| onnxruntime 1.31 vs onnxruntime-training 1.19.2: "
          f"{np.abs(new_predict - old_predict).max():.3g} (logits up to {np.abs(old_predict).max():.3g})")



def test_a_predict_replica_on_onnxruntime_1_31_serves_what_a_trainer_published(predict_python, exported, tmp_path):
    """A trainer (training build) takes steps and publishes (attention fused into com.microsoft.MultiHeadAttention);
    a predict replica on plain onnxruntime 1.31 started on the same data folder serves that version, same logits."""
    images, labels = batch(16, seed=8)
    flags = ("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--http-port", "-1")
    trainer = start_server(*flags, env=clean_env(VITSERVE_DATA_DIR=str(tmp_path)))
    try:
        with ViTClient(trainer.address, timeout=60) as client:
            fresh = client.predict(images, return_logits=True).logits
            for seed in (1, 2):
                client.train_step(*batch(16, seed=seed), summaries=False)
            assert client.publish().version == 1
            published = client.predict(images, return_logits=True)
        assert published.model_version == 1 and not np.allclose(published.logits, fresh, atol=1e-3)
        replica = start_server(*flags, "--role", "predict", command=[str(predict_python), "-m", "server"],
                               env=venv_env(VITSERVE_DATA_DIR=str(tmp_path)))
        try:
            with ViTClient(replica.address, timeout=60) as client:
                served = client.predict(images, return_logits=True)
        finally:
            replica.stop()
    finally:
        trainer.stop()
    assert served.model_version == 1
    np.testing.assert_allclose(served.logits, published.logits, rtol=RTOL, atol=ATOL)
    print(f"\nmax |logit difference| of published version 1, onnxruntime 1.31 vs 1.19.2 training build: "
          f"{np.abs(served.logits - published.logits).max():.3g}")


@pytest.mark.parametrize("role", ["train", "all"])
def test_training_roles_on_plain_onnxruntime_are_one_error_line(predict_python, exported, tmp_path, role):
    result = subprocess.run([str(predict_python), "-m", "server", "--artifacts", str(exported[0]), "--role", role,
                             "--port", "0", "--metrics-port", "-1", "--http-port", "-1"], cwd=REPO,
                            env=venv_env(VITSERVE_DATA_DIR=str(tmp_path)), capture_output=True, text=True,
                            timeout=START_TIMEOUT)
    line = assert_one_error_line(result, 2)
    assert "training needs ONNX Runtime's training build (onnxruntime-training-cpu" in line, line
    assert "onnxruntime 1.31." in line and line.endswith("start it with --role predict"), line


# ---------------------------------------------------------------- the image: Dockerfile's ROLE=predict

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments) as a builder reads them: comment lines
    dropped, a line ending in a backslash joined to the next with both removed (one shell line for RUN)."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1]
            continue
        instruction, _, args = logical.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
        logical = ""
    return stages[1:]  # stages[0]: the global ARGs before the first FROM


def lock_step(stage: list[tuple[str, str]]) -> str:
    (run,) = [args for instruction, args in stage if instruction == "RUN" and 'case "$ROLE"' in args]
    return run


def run_lock_step(tmp_path: Path, role: str, mpi: str = "0") -> subprocess.CompletedProcess:
    """The builder's install step as sh runs it in the image, with /opt/venv/bin/python a stub that prints its
    arguments (so nothing is installed: the step's choice of lock is what is tested)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "python $*"\n')
    stub.chmod(0o755)
    script = lock_step(dockerfile_stages()[0]).replace("/opt/venv/bin/python", str(stub))
    return subprocess.run(["sh", "-c", script], env={"ROLE": role, "MPI": mpi, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("role, lock", [("all", "serve.txt"), ("train", "serve.txt"), ("predict", "predict.txt")])
def test_the_dockerfiles_role_picks_the_lock(tmp_path, role, lock):
    result = run_lock_step(tmp_path, role)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"python -m pip install -r /tmp/requirements/{lock}", result.stdout


def test_the_dockerfiles_mpi_argument_picks_the_mpi_lock_for_a_trainer_only(tmp_path):
    result = run_lock_step(tmp_path, "train", mpi="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "python -m pip install -r /tmp/requirements/mpi.txt", result.stdout
    refused = run_lock_step(tmp_path, "predict", mpi="1")
    assert (refused.returncode, refused.stderr) == (1, "error: MPI=1 trains: use ROLE=all or train, not predict\n")
    assert run_lock_step(tmp_path, "all", mpi="yes").stderr == "error: MPI must be 0 or 1, got 'yes'\n"


def test_the_dockerfile_refuses_an_unknown_role(tmp_path):
    result = run_lock_step(tmp_path, "predcit")
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr == "error: ROLE must be all, train or predict, got 'predcit'\n", result.stderr


def test_the_dockerfiles_predict_image_is_consistent():
    """Both stages take ROLE (default all), the runtime sets VITSERVE_ROLE from it, the roles are the server's,
    the locks are copied into the builder and allowed into the build context, and make docker-predict builds
    ROLE=predict on python:3.13-slim."""
    builder, runtime = dockerfile_stages()
    for stage in (builder, runtime):
        assert ("ARG", "ROLE=all") in stage, stage
    env = "\n".join(args for instruction, args in runtime if instruction == "ENV")
    assert "VITSERVE_ROLE=${ROLE}" in env.split(), env
    roles = {role for case in re.findall(r"(\S+)\) lock=", lock_step(builder)) for role in case.split("|")}
    assert roles == set(typing.get_args(Settings.model_fields["role"].annotation)), roles
    (copy,) = [args.split() for instruction, args in builder if instruction == "COPY" and "/tmp/requirements/" in args]
    assert copy[-1] == "/tmp/requirements/" and sorted(copy[:-1]) == ["requirements/mpi.txt", "requirements/predict.txt",
                                                                 "requirements/serve.txt"]
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    for source in copy[:-1]:
        assert (REPO / source).is_file() and f"!{source}" in allowed, source
    make = ok(subprocess.run(["make", "-n", "--no-print-directory", "docker-predict", "DOCKER=docker"], cwd=REPO,
                             env=clean_env(), capture_output=True, text=True, timeout=60)).stdout
    (build,) = [line for line in make.replace("\\\n", " ").splitlines() if line.startswith("docker build ")]
    assert "--build-arg BASE_IMAGE=python:3.13-slim" in build and "--build-arg ROLE=predict" in build, build
