"""The HTTP door against real servers on 127.0.0.1: tritonclient.http, curl, and the same answers as over gRPC."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from proto import vitserve_pb2 as pb
from server.auth import Security
from server.http import create_http_server
from tests.helpers import MODEL, REPO, TRAINERS, batch, images_msg


@pytest.fixture
def http(serve):
    """(RunningServer, base URL) of a server with its HTTP door on a free port; both stopped after the test."""
    doors = []

    def start(security: Security | None = None, **overrides):
        server = serve(**overrides)
        door = create_http_server(server.plane.settings.model_copy(update={"http_port": 0}), server.plane,
                                  security or Security())
        doors.append(door)
        return server, f"127.0.0.1:{door.port}"

    yield start
    for door in doors:
        door.stop()


def curl(*args: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one curl call."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=60, check=True)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body) if body.strip() else {}


def test_tritonclient_http_health_metadata_and_infer_equal_grpc(http):
    server, url = http()
    client = triton_http.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("no-such-model")
    assert client.get_server_metadata()["name"] == "vitserve"
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

    images, _ = batch(5)
    expected = server.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True)).logits.data
    for binary in (True, False):
        inputs = [triton_http.InferInput("images", list(images.shape), "FP32")]
        inputs[0].set_data_from_numpy(images, binary_data=binary)
        outputs = [triton_http.InferRequestedOutput("logits", binary_data=binary)]
        got = client.infer(MODEL, inputs, outputs=outputs).as_numpy("logits")
        assert got.shape == (5, 10)
        if binary:
            assert got.astype("<f4").tobytes() == expected  # byte for byte
        else:
            np.testing.assert_array_equal(got, np.frombuffer(expected, "<f4").reshape(5, 10))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_curl_infers_json_and_fine_tunes_one_step(http, trainer):
    server, url = http()
    images, labels = batch(4)
    code, answer = curl("-X", "POST", f"http://{url}/v2/models/{MODEL}/infer", "-H", "Content-Type: application/json",
                        "-d", json.dumps({"inputs": [{"name": "images", "shape": list(images.shape),
                                                      "datatype": "FP32", "data": images.tolist()}]}))
    assert code == 200 and answer["model_name"] == MODEL and answer["outputs"][0]["shape"] == [4, 10]
    logits = server.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True)).logits.data
    np.testing.assert_array_equal(np.asarray(answer["outputs"][0]["data"], "<f4"), np.frombuffer(logits, "<f4"))

    body = {"images": {"tensor": {"dtype": "FLOAT32", "shape": list(images.shape),
                                  "data": base64.b64encode(images.tobytes()).decode()}},
            "labels": {"dtype": "INT64", "shape": [4], "data": base64.b64encode(labels.tobytes()).decode()}}
    code, step = curl("-X", "POST", f"http://{url}/v1/train-step", "-d", json.dumps(body))
    assert code == 200 and step["step"] == "1" and step["applied"] is True  # int64 is a string in proto3 JSON
    assert len(step["gradients"]) == 52 and len(step["attention"]) == 4
    assert server.engine.step == 1 and server.engine.trainer == trainer
    code, info = curl(f"http://{url}/v1/model-info")
    assert code == 200 and info["step"] == "1" and info["name"] == MODEL
    code, history = curl(f"http://{url}/v1/gradient-history?parameter=mlp_head.*")
    assert code == 200 and [s["step"] for s in history["steps"]] == ["1"]
    assert {g["sublayer"] for g in history["steps"][0]["gradients"]} == {"head", "head.norm"}


BAD = {  # name -> (HTTP call, the gRPC request that must fail the same way)
    "unknown model": (("POST", "/v2/models/nope/infer", {"inputs": []}),
                      ("ModelInfer", dict(model_name="nope"))),
    "datatype": (("POST", f"/v2/models/{MODEL}/infer",
                  {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]}),
                 ("ModelInfer", dict(datatype="INT64"))),
    "shape": (("POST", f"/v2/models/{MODEL}/infer",
               {"inputs": [{"name": "images", "shape": [1, 1, 4, 16], "datatype": "FP32", "data": [0.0] * 64}]}),
              ("ModelInfer", dict(shape=[1, 1, 4, 16]))),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_the_same_code_and_message_as_over_grpc(http, case):
    from proto import open_inference_pb2 as v2
    from server.kserve import METHODS

    server, url = http()
    (method, path, body), (rpc, fields) = BAD[case]
    request = v2.ModelInferRequest(model_name=fields.get("model_name", MODEL))
    request.inputs.add(name="images", datatype=fields.get("datatype", "FP32"), shape=fields.get("shape", [1, 1, 8, 8]))
    request.raw_input_contents.append(np.zeros(64, "<f4" if fields.get("datatype", "FP32") == "FP32" else "<i8")
                                      .tobytes())
    call = server.channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}",
                                      request_serializer=METHODS[rpc][0].SerializeToString,
                                      response_deserializer=METHODS[rpc][1].FromString)
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    code, answer = curl("-X", method, f"http://{url}{path}", "-d", json.dumps(body))
    from server.http import HTTP_STATUS
    assert code == HTTP_STATUS[e.value.code()]
    assert answer == {"error": e.value.details()}


def test_http_errors_for_bodies_the_wire_cannot_parse(http):
    _, url = http()
    code, answer = curl("-X", "POST", f"http://{url}/v2/models/{MODEL}/infer", "-d", "{not json")
    assert code == 400 and answer["error"].startswith("the request body is not valid JSON: ")
    code, answer = curl("-X", "POST", f"http://{url}/v1/train-step", "-d", '{"images": 7}')
    assert code == 400 and answer["error"].startswith("the request body is not a valid TrainStepRequest: ")
    code, answer = curl(f"http://{url}/v3/nothing")
    assert code == 404 and answer == {"error": "no route GET /v3/nothing (see docs/api.md)"}


def test_tokens_guard_http_like_grpc(http, tmp_path):
    security = Security(read_token="reader-token-123", write_token="writer-token-456")
    server, url = http(security=security)
    images, labels = batch(2)
    infer = json.dumps({"inputs": [{"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                    "data": images.reshape(-1).tolist()}]})
    code, answer = curl("-X", "POST", f"http://{url}/v2/models/{MODEL}/infer", "-d", infer)
    assert code == 401 and answer["error"].startswith("missing or invalid bearer token")
    code, _ = curl("-X", "POST", f"http://{url}/v2/models/{MODEL}/infer", "-d", infer,
                   "-H", "Authorization: Bearer reader-token-123")
    assert code == 200
    code, _ = curl(f"http://{url}/v2/health/ready")  # probes stay open
    assert code == 200
    step = json.dumps({"images": {"tensor": {"dtype": "FLOAT32", "shape": [2, 1, 8, 8],
                                             "data": base64.b64encode(images.tobytes()).decode()}},
                       "labels": {"dtype": "INT64", "shape": [2], "data": base64.b64encode(labels.tobytes()).decode()}})
    code, answer = curl("-X", "POST", f"http://{url}/v1/train-step", "-d", step,
                        "-H", "Authorization: Bearer reader-token-123")
    assert code == 403 and answer == {"error": "TrainStep changes the model and needs the write token "
                                               "(got the read token)"}
    assert server.engine.step == 0
    with pytest.raises(InferenceServerException):
        triton_http.InferenceServerClient(url=url).get_model_metadata(MODEL)  # no token: refused


def test_tritonclient_http_config_statistics_and_repository_index_equal_grpc(http):
    import tritonclient.grpc as triton_grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    server, url = http()
    client = triton_http.InferenceServerClient(url=url)
    grpc_client = triton_grpc.InferenceServerClient(server.address)
    config = client.get_model_config(MODEL)
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's own proto, from the JSON
    assert parsed == grpc_client.get_model_config(MODEL).config  # field for field the gRPC answer
    assert config["name"] == MODEL and config["max_batch_size"] == 32 and config["input"][0]["dims"] == [1, 8, 8]
    images, _ = batch(3)
    inputs = [triton_http.InferInput("images", list(images.shape), "FP32")]
    inputs[0].set_data_from_numpy(images)
    client.infer(MODEL, inputs)
    client.infer(MODEL, inputs)
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_count"] == 6 and stats["execution_count"] == 2
    assert stats["inference_stats"]["success"]["count"] == 2
    assert client.get_model_repository_index() == [
        {"name": MODEL, "version": "0", "state": "READY", "reason": ""}]


def test_the_kserve_sdk_rest_and_grpc_clients_get_predicts_logits(http, tmp_path):
    """kserve's InferenceRESTClient and InferenceGRPCClient, in their own process (tests/kserve_sdk_client.py)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve SDK is not installed (requirements/dev.txt installs it)")
    server, url = http()
    images, _ = batch(3)
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run([sys.executable, "tests/kserve_sdk_client.py", url, server.address, MODEL,
                           str(tmp_path / "images.npy")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    expected = np.frombuffer(server.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
                             .logits.data, "<f4").reshape(3, 10)
    for door in ("rest", "grpc"):
        answer = answers[door]
        assert answer["live"] and answer["ready"] and answer["model_ready"], (door, answer)
        np.testing.assert_array_equal(np.asarray(answer["logits"], "<f4"), expected)
