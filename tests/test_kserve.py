"""KServe v2 / Open Inference Protocol: the real `tritonclient[grpc]` against a real server on 127.0.0.1.

The same port serves vitserve.v1 and inference.GRPCInferenceService; ModelInfer must give Predict's logits
(and PyTorch's), go through the dynamic batcher, follow Publish, and answer bad requests with the right code.
"""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from proto import vitserve_pb2 as pb
from tests.helpers import CONFIG, batch, images_msg, tensor

MODEL = "digits4"  # the conftest model's name
SHAPE = [CONFIG.channels, CONFIG.image_size, CONFIG.image_size]


@pytest.fixture
def v2(running):
    """(running server, tritonclient over a real channel to it)."""
    client = tc.InferenceServerClient(running.address)
    yield running, client
    client.close()


def infer(client: tc.InferenceServerClient, images: np.ndarray, model: str = MODEL, version: str = "", **kw):
    inp = tc.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    return client.infer(model, [inp], model_version=version, outputs=[tc.InferRequestedOutput("logits")], **kw)


def predict_logits(running, images: np.ndarray) -> np.ndarray:
    r = running.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
    return np.frombuffer(r.logits.data, dtype=np.float32).reshape(list(r.logits.shape))


def test_liveness_readiness_and_metadata(v2):
    running, client = v2
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready(MODEL) is True
    assert client.is_model_ready(MODEL, "0") is True
    assert client.is_model_ready(MODEL, "1") is False  # nothing published yet
    assert client.is_model_ready("resnet50") is False

    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "vitserve" and server["version"]

    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta == {
        "name": MODEL, "versions": ["0"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": ["-1", *map(str, SHAPE)]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": ["-1", str(CONFIG.num_classes)]}],
    }


def test_infer_equals_predict_and_pytorch(v2, torch_model):
    running, client = v2
    images, _ = batch(5, seed=3)
    result = infer(client, images, request_id="req-7")
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (5, CONFIG.num_classes)
    np.testing.assert_array_equal(logits, predict_logits(running, images))  # same engine, same batch
    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "0", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("logits", "FP32", [5, CONFIG.num_classes])]


def test_infer_with_typed_contents(v2):
    """Inputs in `contents.fp32_contents` (Triton's own generated proto, so the wire format is the standard's)."""
    running, _ = v2
    images, _ = batch(2, seed=4)
    request = service_pb2.ModelInferRequest(model_name=MODEL, inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name="images", datatype="FP32", shape=list(images.shape),
            contents=service_pb2.InferTensorContents(fp32_contents=images.ravel().tolist()))])
    response = service_pb2_grpc.GRPCInferenceServiceStub(running.channel).ModelInfer(request, timeout=30)
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(logits, predict_logits(running, images))


def test_infer_goes_through_the_dynamic_batcher(v2, serve):
    running, client = v2
    before = sum(running.plane.registry.model().batcher.batch_sizes.values())
    infer(client, batch(3, seed=1)[0])
    assert sum(running.plane.registry.model().batcher.batch_sizes.values()) == before + 1

    # Concurrent ModelInfer and Predict calls share batches; each caller still gets exactly its own rows.
    inputs = [batch(1 + i % 3, seed=10 + i)[0] for i in range(12)]
    alone = [predict_logits(running, x) for x in inputs]
    rows = sum(len(x) for x in inputs)
    # A batcher that runs a batch once it holds all those rows (or after 30 s): the calls share one batch.
    shared = serve(max_dynamic_batch=rows, max_batch_delay_ms=30_000)
    shared_client = tc.InferenceServerClient(shared.address)
    results: list = [None] * len(inputs)

    def call(i: int) -> None:
        if i % 2:
            results[i] = infer(shared_client, inputs[i]).as_numpy("logits")
        else:
            results[i] = predict_logits(shared, inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared_client.close()
    for got, want in zip(results, alone):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The batcher ran the 6 ModelInfer and the 6 Predict calls as one batch of all their rows; the data
    # plane's batch-size histogram saw that one batch and nothing else.
    assert shared.plane.registry.model().batcher.batch_sizes == {rows: 1}
    registry = shared.plane.metrics.registry
    assert registry.get_sample_value("vitserve_batch_size_count") == 1
    assert registry.get_sample_value("vitserve_batch_size_sum") == rows == 24
    assert registry.get_sample_value("vitserve_batch_size_bucket", {"le": "16.0"}) == 0
    assert registry.get_sample_value("vitserve_batch_size_bucket", {"le": "32.0"}) == 1


def test_published_version_is_the_v2_version(v2):
    running, client = v2
    images, labels = batch(8, seed=5)
    for _ in range(2):
        running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    assert running.stub.Publish(pb.PublishRequest()).version == 1

    assert client.get_model_metadata(MODEL, as_json=True)["versions"] == ["1"]
    assert client.is_model_ready(MODEL, "1") is True
    assert client.is_model_ready(MODEL, "0") is False
    result = infer(client, images, version="1")
    assert result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("logits"), predict_logits(running, images))
    with pytest.raises(InferenceServerException) as e:
        infer(client, images, version="0")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert e.value.message() == (f"model '{MODEL}' version '0' is not served; the version being served is 1 "
                                 "(leave the version empty for it)")


def raw_request(images: np.ndarray, **changes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=list(images.shape))],
        raw_input_contents=[images.tobytes()])
    for change in changes.values():
        change(request)
    return request


IMAGES = batch(3, seed=6)[0]
NAN_IMAGES = IMAGES.copy()
NAN_IMAGES[0, 0, 0, 0] = np.nan
BAD_REQUESTS = {
    "unknown model": (lambda r: setattr(r, "model_name", "resnet50"), "NOT_FOUND",
                      f"model 'resnet50' is not served here; this server serves '{MODEL}'"),
    "unknown version": (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND",
                        f"model '{MODEL}' version '9' is not served; the version being served is 0 "
                        "(leave the version empty for it)"),
    "wrong input name": (lambda r: setattr(r.inputs[0], "name", "pixels"), "INVALID_ARGUMENT",
                         "inputs: unknown input 'pixels'; the model's input is 'images'"),
    "wrong datatype": (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "INVALID_ARGUMENT",
                       "input 'images': datatype must be FP32 (normalized pixels), got 'FP16'"),
    "wrong shape": (lambda r: r.inputs[0].shape.__delitem__(1), "INVALID_ARGUMENT",
                    f"images: shape must be [batch, {', '.join(map(str, SHAPE))}], got [3, 8, 8]"),
    "short data": (lambda r: r.raw_input_contents.__setitem__(0, IMAGES.tobytes()[:-4]), "INVALID_ARGUMENT",
                   "images: 764 bytes do not match shape [3, 1, 8, 8] of FLOAT32 (768 bytes expected)"),
    "NaN pixel": (lambda r: r.raw_input_contents.__setitem__(0, NAN_IMAGES.tobytes()), "INVALID_ARGUMENT",
                  "images: 1 pixel values are NaN or Inf"),
    "two inputs": (lambda r: r.inputs.append(r.inputs[0]), "INVALID_ARGUMENT",
                   "inputs: the model takes exactly 1 input ('images'), got 2"),
    "no data": (lambda r: r.ClearField("raw_input_contents"), "INVALID_ARGUMENT",
                "input 'images': no data (set raw_input_contents or contents.fp32_contents)"),
    "raw and typed data": (lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * IMAGES.size),
                           "INVALID_ARGUMENT", "input 'images': data given both in raw_input_contents and in contents"),
    "typed data of another type": (lambda r: r.inputs[0].contents.int64_contents.append(1), "INVALID_ARGUMENT",
                                   "input 'images': FP32 data goes in contents.fp32_contents, not int64_contents"),
    "unknown output": (lambda r: r.outputs.add(name="probabilities"), "INVALID_ARGUMENT",
                       "outputs: unknown output 'probabilities'; the model's output is 'logits'"),
    "batch over the limit": (lambda r: (r.inputs[0].shape.__setitem__(0, 33),
                                        r.raw_input_contents.__setitem__(0, np.zeros((33, *SHAPE), "<f4").tobytes())),
                             "INVALID_ARGUMENT", "images: batch of 33 is over the maximum of 32"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_v2_requests_get_clear_statuses(running, case):
    change, code, message = BAD_REQUESTS[case]
    stub = service_pb2_grpc.GRPCInferenceServiceStub(running.channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(raw_request(IMAGES, change=change), timeout=30)
    assert (e.value.code().name, e.value.details()) == (code, message)
    # The server still serves (and the request changed nothing).
    ok = stub.ModelInfer(raw_request(IMAGES), timeout=30)
    assert list(ok.outputs[0].shape) == [3, CONFIG.num_classes]
    assert running.engine.step == 0


def test_bad_requests_through_tritonclient(v2):
    running, client = v2
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("resnet50")
    assert (e.value.status(), e.value.message()) == (
        "StatusCode.NOT_FOUND", f"model 'resnet50' is not served here; this server serves '{MODEL}'")
    with pytest.raises(InferenceServerException) as e:
        infer(client, np.zeros((2, 3, 8, 8), np.float32))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == "images: shape must be [batch, 1, 8, 8], got [2, 3, 8, 8]"
    # Methods of the full protocol that vitserve does not serve.
    with pytest.raises(InferenceServerException) as e:
        client.load_model(MODEL)  # RepositoryIndex is served (tests/test_kserve_complete.py); load is not
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert client.is_server_live() is True


def test_v2_with_bearer_tokens(serve):
    running = serve(read_token="read-secret", write_token="write-secret")
    client = tc.InferenceServerClient(running.address)
    images = batch(2, seed=8)[0]
    assert client.is_server_live() is True  # probes carry no token
    assert client.is_server_ready() is True
    with pytest.raises(InferenceServerException) as e:
        infer(client, images)
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(MODEL)
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    result = infer(client, images, headers={"authorization": "Bearer read-secret"})
    assert result.as_numpy("logits").shape == (2, CONFIG.num_classes)
    assert client.is_model_ready(MODEL, headers={"authorization": "Bearer read-secret"}) is True
    client.close()


def test_not_ready_once_shutdown_began(v2):
    """ServerReady/ModelReady turn false when the data plane closes (SIGTERM), while ServerLive stays true."""
    running, client = v2
    assert client.is_server_ready() is True
    running.plane.close()
    assert client.is_server_live() is True
    assert client.is_server_ready() is False
    assert client.is_model_ready(MODEL) is False
