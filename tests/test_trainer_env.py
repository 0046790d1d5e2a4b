"""The trainer environment on the maintained ONNX Runtime: `make ort-env` (Python 3.13, onnxruntime 1.31,
requirements/ort.txt) has neither torch nor ONNX Runtime's training build, serves `--role predict` with the
training build's logits on the same artifacts, and trains with `--role all --trainer ort`.

The environment is the Makefile's own target, built into .cache/ort-env-<hash> (git-ignored; the hash is of
requirements/ort.txt and pyproject.toml, so a changed lock gets a new environment and the old one is removed). A
cached environment costs a few seconds; a fresh machine pays the install (about a minute with a cold pip cache).
CI reaches PyPI: a failed install fails the test, it never skips.

The servers are real `python -m server` processes on 127.0.0.1 started from the repository root (so all run this
checkout's code; only the interpreter and its site-packages differ). The reference is .venv's training build
(--trainer ort-training), asked the same batch through Predict (client.ViTClient) and KServe v2 ModelInfer
(tritonclient.grpc). The Dockerfiles' choice of lock is tested in tests/test_packaging.py, the image itself by
tests/docker/run.sh.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as triton

from client.client import ViTClient
from tests.helpers import (LEARNING_RATE, MODEL, REPO, START_TIMEOUT, assert_one_error_line, batch, clean_env, ok,
                           start_server)

pytestmark = pytest.mark.e2e  # a second Python environment

CACHE = REPO / ".cache"
KEYED_BY = ("requirements/ort.txt", "requirements/openvino.txt", "pyproject.toml")
INSTALL_TIMEOUT = 600.0  # seconds for `make ort-env` (measured: ~40 s with a warm pip cache)
PYTHON = (3, 13)
ORT_SERIES = "1.31."
ATOL, RTOL = 1e-5, 1e-5
SERVER_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-port", "-1")


def env_key() -> str:
    digest = hashlib.sha256()
    for name in KEYED_BY:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def venv_env(**extra: str) -> dict[str, str]:
    """clean_env() without what could make the ort venv's Python see another environment's packages."""
    env = clean_env(**extra)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def ort_python() -> Path:
    """The Python of a `make ort-env` environment for this lock, built on first use and reused after."""
    CACHE.mkdir(exist_ok=True)
    venv = CACHE / f"ort-env-{env_key()}"
    with open(CACHE / "ort-env.lock", "w") as lock:  # one builder at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in [*CACHE.glob("ort-env-*"), *CACHE.glob("predict-env-*")]:
            if old != venv and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)  # environments of older locks: ~300 MB each
        t0 = time.monotonic()
        result = subprocess.run(["make", "--no-print-directory", "ort-env", f"ORT_VENV={venv}"], cwd=REPO,
                                env=venv_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        took = time.monotonic() - t0
    if result.returncode != 0:
        pytest.fail(f"`make ort-env ORT_VENV={venv}` failed (exit {result.returncode}) after {took:.0f}s; it "
                    f"needs python3.13 (or pyenv's 3.13) and PyPI. Its output:\n{(result.stdout + result.stderr)[-4000:]}")
    print(f"\nmake ort-env ({'cached' if 'pip install' not in result.stdout else 'installed'}): {took:.1f}s")
    return venv / "bin/python"


def in_venv(python: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=REPO, env=venv_env(), capture_output=True, text=True,
                          timeout=START_TIMEOUT)


def test_the_ort_env_is_python_3_13_on_onnxruntime_1_31_without_torch_or_the_training_build(ort_python):
    """The premise of the other tests: the maintained ONNX Runtime, safetensors, and neither torch nor ORT's
    training parts."""
    facts = json.loads(ok(in_venv(ort_python, (
        "import json, sys, importlib.metadata as m, onnxruntime, safetensors.numpy\n"
        "from onnxruntime.capi import _pybind_state as C\n"
        "names = sorted(d.metadata['Name'].lower() for d in m.distributions())\n"
        "print(json.dumps({'python': sys.version.split()[0], 'ort': onnxruntime.__version__,\n"
        "    'ort_file': onnxruntime.__file__, 'runtimes': [n for n in names if n.startswith('onnxruntime')],\n"
        "    'training_classes': [c for c in ('Module', 'Optimizer', 'load_checkpoint') if hasattr(C, c)]}))"))).stdout)
    found = tuple(int(part) for part in facts["python"].split(".")[:2])
    assert found == PYTHON, f"the ort env runs Python {facts['python']}, not 3.13 (make ort-env found no python3.13)"
    assert facts["ort"].startswith(ORT_SERIES), facts["ort"]
    assert Path(facts["ort_file"]).is_relative_to(ort_python.parents[1]), facts["ort_file"]
    # One runtime, and OpenVINO's execution provider: a plugin library for it, not a runtime of its own.
    assert facts["runtimes"] == ["onnxruntime", "onnxruntime-ep-openvino"], facts["runtimes"]
    assert facts["training_classes"] == [], facts
    for module in ("torch", "onnxruntime.training"):
        result = in_venv(ort_python, f"import {module}")
        assert result.returncode == 1 and f"No module named '{module}'" in result.stderr, (module, result.stderr)


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


def start_training_build(exported, data_dir: Path):
    """The reference: .venv's onnxruntime-training-cpu 1.19.2, --trainer ort-training."""
    return start_server("--artifacts", str(exported[0]), *SERVER_FLAGS, "--trainer", "ort-training",
                        env=clean_env(VITSERVE_DATA_DIR=str(data_dir)))


def start_ort_env(ort_python: Path, exported, data_dir: Path, *args: str):
    return start_server("--artifacts", str(exported[0]), *SERVER_FLAGS, *args,
                        command=[str(ort_python), "-m", "server"], env=venv_env(VITSERVE_DATA_DIR=str(data_dir)))


def test_predict_on_onnxruntime_1_31_gives_the_training_builds_logits(ort_python, exported, tmp_path):
    images, _ = batch(16, seed=7)
    replica = start_ort_env(ort_python, exported, tmp_path / "replica", "--role", "predict")
    try:
        trainer = start_training_build(exported, tmp_path / "trainer")
        try:
            # Each process runs its own environment's ONNX Runtime (not the other's, not a stray one).
            assert onnxruntime_loaded_by(replica.proc.pid) == {str(next(ort_python.parents[1].glob(
                "lib/python3.*/site-packages")))}, onnxruntime_loaded_by(replica.proc.pid)
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


def test_predict_on_onnxruntime_1_31_serves_what_the_training_build_published(ort_python, exported, tmp_path):
    """The training build takes steps and publishes (attention fused into com.microsoft.MultiHeadAttention); a
    predict replica on onnxruntime 1.31 started on the same data folder serves that version, same logits."""
    images, _ = batch(16, seed=8)
    trainer = start_training_build(exported, tmp_path)
    try:
        with ViTClient(trainer.address, timeout=60) as client:
            fresh = client.predict(images, return_logits=True).logits
            for seed in (1, 2):
                client.train_step(*batch(16, seed=seed), summaries=False)
            assert client.publish().version == 1
            published = client.predict(images, return_logits=True)
        assert published.model_version == 1 and not np.allclose(published.logits, fresh, atol=1e-3)
        replica = start_ort_env(ort_python, exported, tmp_path, "--role", "predict")
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


@pytest.mark.parametrize("devices, provider", [
    (("--device", "cpu"), "CPUExecutionProvider"),
    (("--device", "openvino"), "OpenVINOExecutionProvider"),
    (("--device", "cpu", "--training-device", "openvino"), "CPUExecutionProvider"),  # make serve's, on x86-64
], ids=["cpu", "openvino", "predict-cpu-train-openvino"])
def test_the_ort_env_trains_with_trainer_ort_as_pytorch_does(ort_python, exported, tmp_path, torch_model, devices,
                                                              provider):
    """--role all --trainer ort on onnxruntime 1.31, no torch there, on the CPU execution provider, on OpenVINO's,
    and training on OpenVINO's beside Predict on the CPU's: two TrainSteps whose losses and gradient norms equal
    PyTorch autograd's on the same weights and batches (AdamW in between), and GetModelInfo says so (its
    execution providers are Predict's)."""
    server = start_ort_env(ort_python, exported, tmp_path, "--role", "all", "--trainer", "ort", *devices)
    try:
        with ViTClient(server.address, timeout=60) as client:
            info = client.model_info()
            results = [client.train_step(*batch(16, seed=seed), summaries=False) for seed in (1, 2)]
    finally:
        server.stop()
    assert (info.step, info.trainer, info.onnxruntime_version) == (0, "ort", "1.31.1")
    assert info.execution_providers[0] == provider, info.execution_providers
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    torch_model.train()
    for seed, result in zip((1, 2), results):
        images, labels = batch(16, seed=seed)
        optimizer.zero_grad()
        loss = F.cross_entropy(torch_model(torch.from_numpy(images)), torch.from_numpy(labels))
        loss.backward()
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in torch_model.parameters())))
        optimizer.step()
        assert result.loss == pytest.approx(float(loss.detach()), rel=1e-5) and result.step == seed
        assert result.grad_norm == pytest.approx(norm, rel=1e-4)


def test_the_deprecated_trainer_in_the_ort_env_is_one_error_line(ort_python, exported, tmp_path):
    result = subprocess.run([str(ort_python), "-m", "server", "--artifacts", str(exported[0]), "--port", "0",
                             "--trainer", "ort-training"], cwd=REPO, env=venv_env(VITSERVE_DATA_DIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=START_TIMEOUT)
    line = assert_one_error_line(result, 2)
    assert line == ("error: --trainer ort-training needs ONNX Runtime's deprecated training build "
                    "(onnxruntime-training-cpu==1.19.2, Python <= 3.12: pip install .[ort-training]), but this "
                    "environment has onnxruntime 1.31.1: use --trainer ort, which trains on it")


OPENVINO_VS_CPU = """
import json, sys
import numpy as np
from engine.manifest import Manifest
from engine.runtime import session_options
from engine.train.step import TrainingEngine

manifest = Manifest.load(sys.argv[1])


def batch(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *manifest.input_shape[1:])).astype(np.float32),
            rng.integers(0, manifest.num_classes, n).astype(np.int64))


engines = {d: TrainingEngine(manifest, d, session_options(2), 1e-3, trainer="ort") for d in ("cpu", "openvino")}
out = {"losses": {}, "eval": {}, "weights": {}}
grads = {d: engine.gradients(*batch(16, seed=39))[1] for d, engine in engines.items()}
out["grads"] = max(float(np.linalg.norm(grads["cpu"][n] - grads["openvino"][n]) / np.linalg.norm(grads["cpu"][n]))
                   for n in grads["cpu"])
# Batch sizes that change and come back: OpenVINO runs one compiled graph per batch size.
for d, engine in engines.items():
    out["losses"][d] = [engine.train_step(*batch(n, seed=40 + i), summaries=False).loss
                        for i, n in enumerate((16, 16, 7, 16, 5, 7))]
    result = engine.eval_step(*batch(9, seed=99))
    out["eval"][d] = [result.loss, result.correct]
cpu, ov = engines["cpu"].parameters(), engines["openvino"].parameters()
out["weights"] = {n: float(np.linalg.norm(cpu[n] - ov[n]) / np.linalg.norm(cpu[n])) for n in cpu}
# A checkpoint saved on OpenVINO resumes on the CPU provider: the same weights, bit for bit, and the same next step.
path = sys.argv[2] + "/from-openvino"
engines["openvino"].save_checkpoint(path)
resumed = TrainingEngine(manifest, "cpu", session_options(2), 1e-3, checkpoint=path, trainer="ort")
out["resumed_equal"] = all(np.array_equal(resumed.parameters()[n], ov[n]) for n in ov)
out["next"] = [e.train_step(*batch(16, seed=7), summaries=False).loss for e in (engines["openvino"], resumed)]
print(json.dumps(out))
"""


def test_openvino_trains_as_the_cpu_provider_does(ort_python, exported, tmp_path):
    """--device openvino in the ort env: the same gradients to 1e-5, then six AdamW steps whose batch sizes change
    and come back (one compiled graph per size) and an EvalStep, on the CPU execution provider and on OpenVINO's:
    the same losses to 1e-5, and a checkpoint that moves between them. OpenVINO's provider copies bound inputs when they are bound; were the parameters not bound again before
    each run, the second step would see the first step's weights."""
    result = subprocess.run([str(ort_python), "-c", OPENVINO_VS_CPU, str(exported[0]), str(tmp_path)], cwd=REPO,
                            env=venv_env(), capture_output=True, text=True, timeout=START_TIMEOUT * 3)
    out = json.loads(ok(result).stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["losses"]["openvino"], out["losses"]["cpu"], rtol=1e-5)
    assert out["eval"]["openvino"][1] == out["eval"]["cpu"][1]
    assert out["eval"]["openvino"][0] == pytest.approx(out["eval"]["cpu"][0], rel=1e-5)
    assert out["grads"] < 1e-5, out["grads"]  # the same weights: every gradient tensor within 1e-5 (by norm)
    # After six AdamW steps, by tensor norm, 1e-4: Adam divides by sqrt(v), so where a gradient is ~1e-8 (GELU's flat
    # tail), the other rounding order of OpenVINO's matrix products (oneDNN's, not MLAS's) becomes a step of ~lr
    # either way. Measured: 1.8e-5 on an MLP weight, the rest below 1e-7.
    worst = max(out["weights"], key=out["weights"].get)
    assert out["weights"][worst] < 1e-4, (worst, out["weights"])
    assert out["resumed_equal"]
    assert out["next"][0] == pytest.approx(out["next"][1], rel=1e-5)
