"""A trainer and predict replicas sharing a Triton-layout model repository, as real processes on 127.0.0.1.

The trainer publishes into <repo>/<model>/<version>/; replicas poll the repository, load new versions, serve
every model in it by name, skip versions that do not load and keep serving what they had. The oracle for
logits is a fresh ONNX Runtime session on the very file the repository holds.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.http as triton_http
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2 as triton_model_config
from tritonclient.utils import InferenceServerException

from engine.manifest import ATTRIBUTION_MODEL, INFERENCE_MODEL, Manifest
from engine.store.repository import CONFIG_FILE, MODEL_FILE, write_model_files, write_version_files
from engine.store.triton import model_config
from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from proto.tensors import tensor_from_proto
from tests.helpers import (
    MODEL,
    TRAINERS,
    batch,
    clean_env,
    images_msg,
    metric,
    run_server_to_exit,
    scrape,
    start_server,
    tensor,
    wait_for,
)

POLL = 1.0  # seconds between a replica's scans of the repository


class Replica:
    """A started server process with a stub and a tritonclient on its port."""

    def __init__(self, server):
        self.server = server
        self.channel = grpc.insecure_channel(server.address)
        self.stub = vitserve_pb2_grpc.VitServeStub(self.channel)
        self.triton = tc.InferenceServerClient(server.address)

    def logits(self, images: np.ndarray, model: str = "") -> tuple[int, np.ndarray]:
        answer = self.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True, model=model),
                                   timeout=30)
        return answer.model_version, np.frombuffer(answer.logits.data, np.float32).reshape(len(images), -1)

    def version(self, model: str = "") -> int:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=30).model_version

    def index(self) -> list[tuple[str, str, str, str]]:
        models = self.triton.get_model_repository_index().models
        return [(m.name, m.version, m.state, m.reason) for m in models]

    def stop(self) -> None:
        self.channel.close()
        self.server.stop()


def start(*args: str, http: bool = False) -> Replica:
    return Replica(start_server("--port", "0", *args, env=clean_env(VITSERVE_HTTP_PORT="0" if http else "-1")))


def oracle(path: Path, images: np.ndarray) -> np.ndarray:
    """The logits of a fresh session on the ONNX file itself."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not ORT's notes on unused initializers
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def train(stub, steps: int, seed: int) -> None:
    for i in range(steps):
        images, labels = batch(8, seed=seed + i)
        stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)), timeout=60)


def within_two_polls(condition, what: str) -> None:
    wait_for(condition, seconds=2 * POLL, what=what)


@pytest.mark.parametrize("backend", TRAINERS)
def test_replicas_follow_the_trainer_through_the_repository(exported, tmp_path, backend):
    """A training replica on either trainer publishes into the repository; predict replicas follow."""
    repo = tmp_path / "repo"
    trainer = start("--artifacts", str(exported[0]), "--role", "train", "--model-repository", str(repo),
                    "--learning-rate", "0.01", "--trainer", backend)
    replicas = [start("--role", "predict", "--model-repository", str(repo), "--repository-poll-seconds", str(POLL))
                for _ in range(2)]
    try:
        # The trainer handed over version 1 (its weights at startup); the replicas serve it.
        assert sorted(p.name for p in (repo / MODEL).iterdir()) == ["1", ATTRIBUTION_MODEL, CONFIG_FILE, "labels.txt", "manifest.json"]
        images, _ = batch(5, seed=11)
        for r in replicas:
            assert r.version(MODEL) == 1
            version, logits = r.logits(images)
            assert version == 1
            np.testing.assert_allclose(logits, oracle(repo / MODEL / "1" / MODEL_FILE, images), rtol=1e-6, atol=1e-6)

        # The configuration is Triton's own message: it parses with tritonclient's copy of Triton's proto.
        config = text_format.Parse((repo / MODEL / CONFIG_FILE).read_text(), triton_model_config.ModelConfig())
        assert (config.name, config.platform, config.version_policy.latest.num_versions) == (
            MODEL, "onnxruntime_onnx", 1)

        # Publish: both replicas serve version 2 within two poll intervals, with the trainer's logits.
        assert trainer.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).trainer == backend
        train(trainer.stub, 2, seed=20)
        assert trainer.stub.Publish(pb.PublishRequest(), timeout=60).version == 2
        for r in replicas:
            within_two_polls(lambda r=r: r.version() == 2, "a replica serving version 2")
        _, trained = trainer.logits(images)
        np.testing.assert_allclose(trained, oracle(repo / MODEL / "2" / MODEL_FILE, images), rtol=1e-6, atol=1e-6)
        for r in replicas:
            version, logits = r.logits(images, MODEL)
            assert version == 2
            np.testing.assert_allclose(logits, trained, rtol=1e-6, atol=1e-6)
            assert r.index() == [(MODEL, "1", "UNAVAILABLE", "unloaded"), (MODEL, "2", "READY", "")]
        # Replicas explain the version they serve with the attribution graph the repository carries: the trainer's
        # maps of the same weights (its training weights are what it published).
        fields = dict(images=images_msg(images), method="chefer", targets=[1] * len(images))
        wanted = trainer.stub.Attribute(pb.AttributeRequest(**fields, training_weights=True), timeout=60)
        for r in replicas:
            answer = r.stub.Attribute(pb.AttributeRequest(**fields), timeout=60)
            assert answer.model_version == 2
            for got, want in zip(answer.attributions, wanted.attributions):
                np.testing.assert_allclose(tensor_from_proto(got.map), tensor_from_proto(want.map), rtol=1e-5,
                                           atol=1e-8)

        # 8 Predict threads over both replicas while the trainer publishes 3 times: no error, no version going back.
        errors, seen = [], {}
        stop = threading.Event()

        def client(i: int) -> None:
            mine = seen.setdefault(i, {0: [], 1: []})
            while not stop.is_set():
                which = len(mine[0]) + len(mine[1])
                try:
                    version, _ = replicas[which % 2].logits(batch(1, seed=i)[0])
                    mine[which % 2].append(version)
                except grpc.RpcError as e:  # noqa: PERF203 - a failure is what is being counted
                    errors.append((e.code(), e.details()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for k in range(3):
            train(trainer.stub, 1, seed=30 + k)
            assert trainer.stub.Publish(pb.PublishRequest(), timeout=60).version == 3 + k
            time.sleep(POLL)
        for r in replicas:
            within_two_polls(lambda r=r: r.version() == 5, "a replica serving version 5")
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        assert errors == []
        for i, by_replica in seen.items():
            for versions in by_replica.values():
                assert versions and versions == sorted(versions), f"client {i} saw a version going back: {versions}"
        assert {v for by_replica in seen.values() for versions in by_replica.values() for v in versions} >= {2, 5}

        # A broken version 6 (the model file truncated, as a failed copy leaves it) is skipped: 5 stays served.
        good = repo / MODEL / "5"
        broken = tmp_path / "6"
        shutil.copytree(good, broken)
        size = (broken / MODEL_FILE).stat().st_size
        with open(broken / MODEL_FILE, "r+b") as f:
            f.truncate(size // 2)
        broken.rename(repo / MODEL / "6")
        expected = f"failed to load: {MODEL_FILE} has {size // 2} bytes, {size} were written"
        for r in replicas:
            within_two_polls(lambda r=r: (MODEL, "6", "UNAVAILABLE", expected) in r.index(), "version 6 refused")
            assert r.version() == 5 and r.logits(images)[0] == 5
            assert (MODEL, "5", "READY", "") in r.index()
        # Without a meta.json to check against, ONNX Runtime itself refuses the file: still skipped, still 5.
        (repo / MODEL / "6" / "meta.json").unlink()
        for r in replicas:
            within_two_polls(lambda r=r: any(m[1] == "6" and m[3].startswith("failed to load: ") and "bytes" not in m[3]
                                             for m in r.index()), "version 6 refused by ONNX Runtime")
            assert r.version() == 5
        # It is tried again on every poll: once whole, it is served.
        shutil.rmtree(repo / MODEL / "6")
        (tmp_path / "whole").mkdir()
        write_version_files(tmp_path / "whole", good / MODEL_FILE, 6, 99, time.time())
        (tmp_path / "whole").rename(repo / MODEL / "6")
        for r in replicas:
            within_two_polls(lambda r=r: r.version() == 6, "the repaired version 6 served")
        assert "model digits4 version 6 cannot be served: " in replicas[0].server.stderr()
        # The trainer numbers its next version after the repository's newest.
        assert trainer.stub.Publish(pb.PublishRequest(), timeout=60).version == 7
    finally:
        for r in [trainer, *replicas]:
            r.stop()


def add_model(repo: Path, name: str, manifest: Manifest, graph: Path, versions=(1,), num_versions: int = 1) -> Path:
    """A model folder as a trainer (or `python -m engine.store.triton`) writes it, under another name."""
    folder = repo / name
    folder.mkdir(parents=True)
    manifest = dataclasses.replace(manifest, name=name)
    write_model_files(folder, manifest, model_config(manifest, num_versions=num_versions))
    for v in versions:
        (folder / str(v)).mkdir()
        write_version_files(folder / str(v), graph, v, 0, time.time())
    return folder


def fine_tune(source: Path, target: Path, shift: float) -> Path:
    """Another model of the same export: every float initializer moved by `shift` times its own scale."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(int(shift * 100))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(init)
            noisy = array + shift * rng.standard_normal(array.shape).astype(np.float32) * (np.std(array) + 1e-3)
            init.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(model, str(target))
    return target


def test_a_replica_serves_every_model_of_the_repository_by_name(exported, tmp_path):
    artifacts = exported[0]
    manifest = Manifest.load(artifacts)
    graphs = {"alpha": artifacts / INFERENCE_MODEL,
              "beta": fine_tune(artifacts / INFERENCE_MODEL, tmp_path / "beta.onnx", 0.5),
              "gamma": fine_tune(artifacts / INFERENCE_MODEL, tmp_path / "gamma.onnx", 0.3)}
    repo = tmp_path / "repo"
    add_model(repo, "alpha", manifest, graphs["alpha"])
    add_model(repo, "beta", manifest, graphs["beta"], versions=(1, 2), num_versions=1)
    (repo / "broken").mkdir()  # a folder without a manifest: listed, never served
    replica = start("--role", "predict", "--model-repository", str(repo), "--repository-poll-seconds", str(POLL),
                    http=True)
    try:
        images, _ = batch(4, seed=5)
        for name in ("alpha", "beta"):
            version, logits = replica.logits(images, name)
            assert version == (2 if name == "beta" else 1)
            np.testing.assert_allclose(logits, oracle(graphs[name], images), rtol=1e-6, atol=1e-6)
            result = replica.triton.infer(name, [tc.InferInput("images", list(images.shape), "FP32")
                                                 .set_data_from_numpy(images)])
            np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=0, atol=0)
            assert replica.stub.GetModelInfo(pb.GetModelInfoRequest(model=name)).name == name
        assert not np.allclose(replica.logits(images, "alpha")[1], replica.logits(images, "beta")[1])
        with pytest.raises(grpc.RpcError) as e:
            replica.logits(images)
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "this replica serves 2 models (alpha, beta): name one in the request's model field")
        no_manifest = ("it has no manifest.json (vitserve replicas need the export's manifest: publish it from a "
                       "trainer with --model-repository, or write the folder with python -m engine.store.triton)")
        assert replica.index() == [("alpha", "1", "READY", ""), ("beta", "1", "UNAVAILABLE", "unloaded"),
                                   ("beta", "2", "READY", ""), ("broken", "", "UNAVAILABLE", no_manifest)]
        metrics = scrape(replica.server.metrics_url)
        size = graphs["alpha"].stat().st_size
        assert metric(metrics, "vitserve_model_weights_bytes", model="alpha", version="1") == size
        assert metric(metrics, "vitserve_model_memory_bytes", model="beta", version="2") > 0

        # A third model copied in appears within two poll intervals, with its own logits.
        staged = add_model(tmp_path / "staging", "gamma", manifest, graphs["gamma"])
        shutil.copytree(staged, repo / "gamma")
        within_two_polls(lambda: ("gamma", "1", "READY", "") in replica.index(), "gamma served")
        np.testing.assert_allclose(replica.logits(images, "gamma")[1], oracle(graphs["gamma"], images),
                                   rtol=1e-6, atol=1e-6)
        # Over HTTP too: the v2 REST API by model name, and vitserve.v1's model field in JSON.
        rest = triton_http.InferenceServerClient(url=replica.server.http_url.removeprefix("http://"))
        inputs = [triton_http.InferInput("images", list(images.shape), "FP32")]
        inputs[0].set_data_from_numpy(images)
        np.testing.assert_array_equal(rest.infer("gamma", inputs).as_numpy("logits"), replica.logits(images, "gamma")[1])
        body = json.dumps({"model": "alpha", "images": {"tensor": {"dtype": "FLOAT32", "shape": list(images.shape),
                           "data": base64.b64encode(images.tobytes()).decode()}}, "returnLogits": True}).encode()
        request = urllib.request.Request(f"{replica.server.http_url}/v1/predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(answer["logits"]["data"]), "<f4").reshape(4, -1),
                                      replica.logits(images, "alpha")[1])

        # A removed model disappears: NOT_FOUND naming what is served, gone from the index and the metrics.
        shutil.rmtree(repo / "beta")
        within_two_polls(lambda: all(m[0] != "beta" for m in replica.index()), "beta gone")
        with pytest.raises(grpc.RpcError) as e:
            replica.logits(images, "beta")
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.NOT_FOUND, "model 'beta' is not served here; this server serves 'alpha', 'gamma'")
        with pytest.raises(InferenceServerException) as e:
            replica.triton.infer("beta", [tc.InferInput("images", list(images.shape), "FP32")
                                          .set_data_from_numpy(images)])
        assert e.value.status() == "StatusCode.NOT_FOUND"
        assert replica.index() == [("alpha", "1", "READY", ""), ("broken", "", "UNAVAILABLE", no_manifest),
                                   ("gamma", "1", "READY", "")]
        assert ("vitserve_model_memory_bytes", (("model", "beta"), ("version", "2"))) not in scrape(
            replica.server.metrics_url)
        assert replica.triton.is_model_ready("alpha") and not replica.triton.is_model_ready("beta")
    finally:
        replica.stop()


def test_a_replica_with_nothing_to_serve_is_not_ready_until_a_model_arrives(exported, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    replica = start("--role", "predict", "--model-repository", str(repo), "--repository-poll-seconds", str(POLL))
    try:
        check = health_pb2_grpc.HealthStub(replica.channel).Check
        assert check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not replica.triton.is_server_ready()
        with pytest.raises(grpc.RpcError) as e:
            replica.logits(batch(1)[0])
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.UNAVAILABLE, f"no model is loaded yet from the model repository {repo}")
        add_model(tmp_path / "staging", MODEL, Manifest.load(exported[0]), exported[0] / INFERENCE_MODEL)
        (tmp_path / "staging" / MODEL).rename(repo / MODEL)
        within_two_polls(lambda: check(health_pb2.HealthCheckRequest()).status ==
                         health_pb2.HealthCheckResponse.SERVING, "the replica ready")
        assert replica.triton.is_server_ready() and replica.logits(batch(1)[0])[0] == 1
    finally:
        replica.stop()


def test_a_trainer_hands_over_what_the_repository_lacks_and_refuses_another_model(exported, serve, tmp_path):
    repo = tmp_path / "repo"
    data = tmp_path / "data"
    trainer = serve(data_dir=data, role="train", model_repository=str(repo))
    assert trainer.stub.Publish(pb.PublishRequest()).version == 2  # 1 was handed over at startup
    trainer.stop()
    # A crash between the data directory's version and the repository's: the restart hands it over.
    shutil.rmtree(repo / MODEL / "2")
    trainer = serve(data_dir=data, role="train", model_repository=str(repo))
    published = data / MODEL / "models" / "v000002" / "inference.onnx"
    assert (repo / MODEL / "2" / MODEL_FILE).read_bytes() == published.read_bytes()
    meta = json.loads((repo / MODEL / "2" / "meta.json").read_text())
    assert (meta["version"], meta["step"]) == (2, 0)
    trainer.stop()

    # The repository's model of that name has other classes: one error line, exit 2.
    manifest = json.loads((repo / MODEL / "manifest.json").read_text())
    manifest["class_names"] = [f"c{i}" for i in range(len(manifest["class_names"]))]
    (repo / MODEL / "manifest.json").write_text(json.dumps(manifest))
    result = run_server_to_exit("--artifacts", str(exported[0]), "--role", "train", "--model-repository", str(repo),
                                env=clean_env())
    assert result.returncode == 2
    assert result.stderr == (f"error: model repository {repo} already holds a different model named '{MODEL}' "
                             "(other inputs, outputs or classes): use another --model-repository, or remove that "
                             "folder\n")
