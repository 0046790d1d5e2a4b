"""The rest of KServe v2 / Triton's service that one model server can answer, with the real tritonclient:
ModelConfig (what `make export-triton` writes), ModelStatistics (exact counts after known calls),
RepositoryIndex (after Publish), ServerMetadata's extensions and UNIMPLEMENTED (with a message) for the
rest; reflection v1 and v1alpha describing the v2 service well enough for a client built from it alone to
run ModelInfer; and the metrics port answering /metrics only.
"""
from __future__ import annotations

import dataclasses

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from google.protobuf import descriptor_pool, message_factory, text_format
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from proto import vitserve_pb2 as pb
from server import kserve
from tests.helpers import CONFIG, MODEL, REPO, batch, images_msg, metric, scrape, tensor

READ_HEADERS = {"authorization": "Bearer read-secret"}


@pytest.fixture
def v2(running):
    """(running server, tritonclient over a real channel to it)."""
    client = tc.InferenceServerClient(running.address)
    yield running, client
    client.close()


def infer(client: tc.InferenceServerClient, images: np.ndarray, model: str = MODEL, **kw):
    inp = tc.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    return client.infer(model, [inp], **kw)


def predict_logits(running, images: np.ndarray) -> np.ndarray:
    r = running.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
    return np.frombuffer(r.logits.data, dtype=np.float32).reshape(list(r.logits.shape))


def export_triton(artifacts, out, *flags: str) -> mc.ModelConfig:
    """What `make export-triton TRITON_FLAGS=flags` writes as config.pbtxt, parsed with tritonclient's proto."""
    run = subprocess.run([sys.executable, "-m", "engine.store.triton", "--artifacts", str(artifacts), "--out", str(out),
                          "--force", *flags], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return text_format.Parse((out / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())


def grpc_error(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=30, **kwargs)
    return e.value.code().name, e.value.details()


# ---------------------------------------------------------------- ModelConfig

def test_model_config_is_what_make_export_triton_writes(serve, exported, tmp_path):
    """A server with the default settings answers exactly the config.pbtxt `make export-triton` writes (same
    message, same bytes); the conftest server's batch limit of 32 is `--max-batch-size 32`."""
    default = serve(max_batch_size=256)  # the Settings default (conftest's servers use 32)
    client = tc.InferenceServerClient(default.address)
    response = client.get_model_config(MODEL)
    written = export_triton(exported[0], tmp_path / "default")
    assert response.config == written
    assert response.config.SerializeToString() == written.SerializeToString()
    assert text_format.MessageToString(response.config) == text_format.MessageToString(written)
    assert (response.config.max_batch_size, response.config.dynamic_batching.max_queue_delay_microseconds) == (256, 100)
    assert client.get_model_config(MODEL, "0").config == written
    client.close()

    limited = serve()
    client = tc.InferenceServerClient(limited.address)
    assert client.get_model_config(MODEL).config == export_triton(exported[0], tmp_path / "32", "--max-batch-size", "32")
    as_json = client.get_model_config(MODEL, as_json=True)["config"]
    assert (as_json["name"], as_json["platform"], as_json["backend"]) == (MODEL, "onnxruntime_onnx", "onnxruntime")
    assert as_json["input"] == [{"name": "images", "data_type": "TYPE_FP32",
                                 "dims": ["1", str(CONFIG.image_size), str(CONFIG.image_size)]}]
    assert as_json["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [str(CONFIG.num_classes)],
                                  "label_filename": "labels.txt"}]
    for model, version, message in (
            ("resnet50", "", f"model 'resnet50' is not served here; this server serves '{MODEL}'"),
            (MODEL, "3", f"model '{MODEL}' version '3' is not served; the version being served is 0 "
                         "(leave the version empty for it)")):
        with pytest.raises(InferenceServerException) as e:
            client.get_model_config(model, version)
        assert (e.value.status(), e.value.message()) == ("StatusCode.NOT_FOUND", message)
    client.close()


# ---------------------------------------------------------------- ModelStatistics

class BrokenEngine:
    """An inference engine whose run fails, as ONNX Runtime's would."""

    def logits(self, images):
        raise RuntimeError("the run failed")


def one(stats_response) -> service_pb2.ModelStatistics:
    (entry,) = stats_response.model_stats
    return entry


def test_statistics_count_every_request_and_run(v2, serve):
    """3 ModelInfer (batches 2, 3, 2) and 2 Predict (4, 1) calls one after the other, each its own run; 3
    failing calls (an invalid ModelInfer, an invalid Predict, a Predict whose run fails) count as failures, a
    call for another model not at all."""
    running, client = v2
    zero = one(client.get_inference_statistics(MODEL))
    assert (zero.name, zero.version, zero.inference_count, zero.execution_count, zero.last_inference) == (
        MODEL, "0", 0, 0, 0)
    assert zero.inference_stats.success.count == zero.inference_stats.fail.count == 0 and not zero.batch_stats

    before_ms = time.time_ns() // 1_000_000
    for n, seed in ((2, 1), (3, 2), (2, 3)):
        infer(client, batch(n, seed=seed)[0])
    for n, seed in ((4, 4), (1, 5)):
        predict_logits(running, batch(n, seed=seed)[0])
    after_ms = time.time_ns() // 1_000_000
    with pytest.raises(InferenceServerException):
        infer(client, np.zeros((2, 3, 8, 8), np.float32))  # INVALID_ARGUMENT: a failure of this model
    assert grpc_error(running.stub.Predict, pb.PredictRequest())[0] == "INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException):
        infer(client, batch(1)[0], model="resnet50")  # NOT_FOUND: not this model's request
    model = running.plane.registry.model()
    serving = model.served
    model.serve((dataclasses.replace(serving[-1], engine=BrokenEngine()),))
    try:
        assert grpc_error(running.stub.Predict, pb.PredictRequest(images=images_msg(batch(2)[0]))) == (
            "INTERNAL", "Predict failed on the server; see its log")
    finally:
        model.serve(serving)

    stats = one(client.get_inference_statistics(MODEL, "0"))
    assert stats == one(client.get_inference_statistics())  # no name: every model (the one served)
    s = stats.inference_stats
    assert (stats.name, stats.version) == (MODEL, "0")
    assert stats.inference_count == 2 + 3 + 2 + 4 + 1  # images of the successful requests
    assert stats.execution_count == 5  # runs that succeeded
    assert before_ms <= stats.last_inference <= after_ms
    assert (s.success.count, s.fail.count) == (5, 3)
    assert s.queue.count == s.compute_input.count == s.compute_infer.count == s.compute_output.count == 5
    assert (s.cache_hit.count, s.cache_miss.count) == (0, 0)
    assert s.success.ns > 0 and s.fail.ns > 0 and s.compute_infer.ns > 0
    # Each request's time covers its queueing and its run's three parts.
    assert s.success.ns >= s.queue.ns + s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns
    assert [(b.batch_size, b.compute_input.count, b.compute_infer.count, b.compute_output.count)
            for b in stats.batch_stats] == [(1, 1, 1, 1), (2, 2, 2, 2), (3, 1, 1, 1), (4, 1, 1, 1)]
    # One request per run: the requests' compute times are their runs' compute times.
    for part in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(s, part).ns == sum(getattr(b, part).ns for b in stats.batch_stats)
    # The Prometheus histogram saw the same runs.
    registry = running.plane.metrics.registry
    assert registry.get_sample_value("vitserve_batch_size_count") == stats.execution_count
    assert registry.get_sample_value("vitserve_batch_size_sum") == stats.inference_count

    as_json = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert (as_json["inference_count"], as_json["execution_count"]) == ("12", "5")
    assert as_json["inference_stats"]["fail"]["count"] == "3"


def test_statistics_of_a_shared_batch(serve):
    """Two ModelInfer and two Predict calls that share one run: one execution, four requests each charged the
    run's compute times (as Triton charges every request of a batch)."""
    sizes = [1, 2, 3, 2]
    rows = sum(sizes)
    shared = serve(max_dynamic_batch=rows, max_batch_delay_ms=30_000)  # runs once it holds all the rows
    client = tc.InferenceServerClient(shared.address)
    calls = [threading.Thread(target=(lambda n=n, i=i: infer(client, batch(n, seed=i)[0]) if i % 2 else
                                      predict_logits(shared, batch(n, seed=i)[0])))
             for i, n in enumerate(sizes)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    stats = one(client.get_inference_statistics(MODEL))
    client.close()
    s = stats.inference_stats
    assert (stats.inference_count, stats.execution_count, s.success.count, s.fail.count) == (rows, 1, 4, 0)
    (run,) = stats.batch_stats
    assert (run.batch_size, run.compute_infer.count) == (rows, 1)
    for part in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(s, part).count == 4
        assert getattr(s, part).ns == 4 * getattr(run, part).ns
    assert s.queue.ns > 0  # the first three waited for the fourth


def test_statistics_without_dynamic_batching(serve):
    running = serve(dynamic_batching=False)
    for n in (3, 2):
        predict_logits(running, batch(n)[0])
    client = tc.InferenceServerClient(running.address)
    stats = one(client.get_inference_statistics(MODEL))
    client.close()
    assert (stats.inference_count, stats.execution_count) == (5, 2)
    assert (stats.inference_stats.queue.count, stats.inference_stats.queue.ns) == (2, 0)  # nothing queues
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(2, 1), (3, 1)]


def test_statistics_per_version(v2):
    running, client = v2
    images, labels = batch(4, seed=7)
    infer(client, images)
    running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    assert running.stub.Publish(pb.PublishRequest()).version == 1
    v0, v1 = client.get_inference_statistics(MODEL).model_stats  # oldest first; the served one has no calls yet
    assert [(s.version, s.inference_count, s.execution_count) for s in (v0, v1)] == [("0", 4, 1), ("1", 0, 0)]
    infer(client, images[:3])
    predict_logits(running, images[:1])
    assert [(s.version, s.inference_count, s.execution_count)
            for s in client.get_inference_statistics(MODEL).model_stats] == [("0", 4, 1), ("1", 4, 2)]
    assert one(client.get_inference_statistics(MODEL, "0")).inference_count == 4
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics(MODEL, "5")
    assert (e.value.status(), e.value.message()) == (
        "StatusCode.NOT_FOUND", f"model '{MODEL}' version '5' has no statistics; the versions with statistics are "
                                "0, 1 (leave the version empty for all)")
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("resnet50")
    assert e.value.status() == "StatusCode.NOT_FOUND"


# ---------------------------------------------------------------- RepositoryIndex

def index(client: tc.InferenceServerClient) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in client.get_model_repository_index().models]


def test_repository_index_after_publish(v2):
    running, client = v2
    assert index(client) == [(MODEL, "0", "READY", "")]
    images, labels = batch(4, seed=9)
    for expected in (1, 2):
        running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
        assert running.stub.Publish(pb.PublishRequest()).version == expected
    assert index(client) == [(MODEL, "0", "UNAVAILABLE", "unloaded"), (MODEL, "1", "UNAVAILABLE", "unloaded"),
                             (MODEL, "2", "READY", "")]
    assert client.get_model_repository_index(as_json=True)["models"][-1] == {
        "name": MODEL, "version": "2", "state": "READY"}
    stub = service_pb2_grpc.GRPCInferenceServiceStub(running.channel)
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=30)
    assert [(m.version, m.state) for m in ready.models] == [("2", "READY")]
    assert grpc_error(stub.RepositoryIndex, service_pb2.RepositoryIndexRequest(repository_name="models")) == (
        "UNIMPLEMENTED", "repository_name 'models': naming a repository is not supported by vitserve (a server "
                         "has one: its model's data directory, or its --model-repository): leave it empty")
    running.plane.close()  # shutdown began: nothing is ready any more
    assert index(client)[-1] == (MODEL, "2", "UNAVAILABLE", "the server is shutting down")
    assert stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=30).models == []


# ---------------------------------------------------------------- extensions, the unsupported rest, tokens

def test_server_metadata_lists_the_extensions_served(v2):
    _, client = v2
    assert client.get_server_metadata(as_json=True)["extensions"] == [
        "model_configuration", "statistics", "model_repository"]


UNSUPPORTED_MESSAGES = {
    "ModelStreamInfer": "ModelStreamInfer is not supported by vitserve: use ModelInfer (one request, one response)",
    "RepositoryModelLoad": "RepositoryModelLoad is not supported by vitserve: vitserve loads models itself: a trainer "
                           "serves its own (vitserve.v1 Publish changes the version), a predict replica follows its "
                           "--model-repository (poll mode)",
    "SystemSharedMemoryRegister": "SystemSharedMemoryRegister is not supported by vitserve: tensors travel in the "
                                  "request and response messages",
    "TraceSetting": "TraceSetting is not supported by vitserve: every RPC is logged with its duration and request "
                    "id instead (--log-json for JSON lines)",
    "LogSettings": "LogSettings is not supported by vitserve: logging is set at startup (--log-level, --log-json)",
}


def test_every_method_of_tritons_service_is_served_or_says_it_is_not(running):
    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert set(kserve.METHODS).isdisjoint(kserve.UNSUPPORTED)
    assert set(kserve.METHODS) | set(kserve.UNSUPPORTED) == set(triton.methods_by_name)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(running.channel)
    for method in triton.methods:
        if method.name in kserve.METHODS:
            continue
        request = message_factory.GetMessageClass(method.input_type)()
        if method.name == "ModelStreamInfer":
            with pytest.raises(grpc.RpcError) as e:
                list(stub.ModelStreamInfer(iter([request]), timeout=30))
            code, details = e.value.code().name, e.value.details()
        else:
            code, details = grpc_error(getattr(stub, method.name), request)
        assert code == "UNIMPLEMENTED", method.name
        assert details.startswith(f"{method.name} is not supported by vitserve: "), details
        assert details == UNSUPPORTED_MESSAGES.get(method.name, details)
    # tritonclient's own calls see the same.
    client = tc.InferenceServerClient(running.address)
    with pytest.raises(InferenceServerException) as e:
        client.unload_model(MODEL)
    assert (e.value.status(), e.value.message()) == (
        "StatusCode.UNIMPLEMENTED", "RepositoryModelUnload is not supported by vitserve: vitserve "
                                    "loads models itself: a trainer serves its own (vitserve.v1 Publish changes the version), a "
                                    "predict replica follows its --model-repository (poll mode)")
    client.close()


def test_new_methods_with_bearer_tokens(serve):
    running = serve(read_token="read-secret", write_token="write-secret")
    client = tc.InferenceServerClient(running.address)
    for call in (lambda **kw: client.get_model_config(MODEL, **kw),
                 lambda **kw: client.get_inference_statistics(MODEL, **kw),
                 lambda **kw: client.get_model_repository_index(**kw)):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        call(headers=READ_HEADERS)  # the read token is enough
    with pytest.raises(InferenceServerException) as e:  # unsupported methods need the write token (fail closed)
        client.load_model(MODEL, headers=READ_HEADERS)
    assert (e.value.status(), e.value.message()) == (
        "StatusCode.PERMISSION_DENIED", "RepositoryModelLoad changes the model and needs the write token "
                                        "(got the read token)")
    with pytest.raises(InferenceServerException) as e:
        client.load_model(MODEL, headers={"authorization": "Bearer write-secret"})
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    client.close()


# ---------------------------------------------------------------- reflection

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


class V1Stub:
    """grpc.reflection.v1's stub: v1alpha's messages (the same on the wire) on the v1 method."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            V1_METHOD, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


class V1Database(ProtoReflectionDescriptorDatabase):
    """grpc_reflection's descriptor database asking reflection v1 instead of v1alpha."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self._stub = V1Stub(channel)


SERVICES = {"vitserve.v1.VitServe", "grpc.health.v1.Health", "inference.GRPCInferenceService",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.mark.parametrize("database", [ProtoReflectionDescriptorDatabase, V1Database], ids=["v1alpha", "v1"])
def test_a_client_built_from_reflection_alone_runs_model_infer(running, database):
    images = batch(3, seed=11)[0]
    with grpc.insecure_channel(running.address) as channel:
        db = database(channel)
        assert set(db.get_services()) == SERVICES
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        assert [m.name for m in service.methods] == list(kserve.METHODS)
        assert db.FindFileContainingSymbol("inference.GRPCInferenceService.ModelInfer").name == \
            "inference/grpc_service.proto"  # a method is a symbol too (grpcurl describes them)
        for name in ("vitserve.v1.VitServe", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"):
            assert pool.FindServiceByName(name).methods
        config = pool.FindMessageTypeByName("vitserve.oip.ModelConfig")  # the vendored Triton config, whole
        assert {"name", "max_batch_size", "input", "output", "dynamic_batching", "instance_group"} <= set(
            config.fields_by_name)

        method = service.methods_by_name["ModelInfer"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class(model_name=MODEL, id="reflected", raw_input_contents=[images.tobytes()])
        request.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
        call = channel.unary_unary(f"/{service.full_name}/{method.name}",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        response = call(request, timeout=30)
    assert (response.model_name, response.model_version, response.id) == (MODEL, "0", "reflected")
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(logits, predict_logits(running, images))


def test_reflection_leaves_the_default_pool_to_tritonclient():
    """Building the reflection pool registers nothing named inference.* in protobuf's default pool: tritonclient
    imports after it in the same (fresh) process, and its service is the one found there."""
    code = ("from google.protobuf import descriptor_pool\n"
            "from grpc_health.v1 import health_pb2\n"
            "from proto import vitserve_pb2\n"
            "from server import reflection\n"
            "pool = reflection.reflection_pool([vitserve_pb2.DESCRIPTOR.services_by_name['VitServe'], "
            "health_pb2.DESCRIPTOR.services_by_name['Health']])\n"
            "assert pool.FindServiceByName('inference.GRPCInferenceService').file.name == 'inference/grpc_service.proto'\n"
            "try:\n"
            "    descriptor_pool.Default().FindServiceByName('inference.GRPCInferenceService')\n"
            "    raise SystemExit('inference.GRPCInferenceService is in the default pool')\n"
            "except KeyError:\n"
            "    pass\n"
            "import tritonclient.grpc\n"
            "print(descriptor_pool.Default().FindServiceByName('inference.GRPCInferenceService').file.name)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "grpc_service.proto\n", "")


# ---------------------------------------------------------------- the metrics port

def http_status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_metrics_port_serves_metrics_only(serve):
    running = serve(metrics_port=0)
    base = f"http://127.0.0.1:{running.plane.metrics.port}"
    predict_logits(running, batch(2)[0])
    assert metric(scrape(f"{base}/metrics"), "vitserve_requests_total", method="Predict", code="OK") == 1
    assert http_status(f"{base}/metrics?name[]=vitserve_model_version")[0] == 200
    for path in ("/", "/v2/health/ready", "/v2/health/live", "/metrics/", "/favicon.ico", "/anything"):
        assert http_status(base + path) == (404, b"404 Not Found: the metrics are at /metrics\n"), path
    # A v2 HTTP client pointed at the metrics port no longer takes it for a ready server.
    client = th.InferenceServerClient(base.removeprefix("http://"))
    assert client.is_server_ready() is False and client.is_server_live() is False
    client.close()
