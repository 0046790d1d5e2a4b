"""Attribute over real servers: the maps the RPC, HTTP and the CLI answer are the attribution engine's on the weights
they name (the served version, a published one, or the trainer's), they change nothing, and bad input gets
Predict's codes and messages. The maps themselves are checked against PyTorch in tests/test_attribution.py."""
from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from client import AttributeResult, ViTClient
from engine.graph.attribution import AttributionEngine, export_weights, published_weights
from engine.manifest import Manifest
from model import export as exporter
from proto import vitserve_pb2 as pb
from proto.convert import from_proto
from server.auth import Security
from server.http import create_http_server
from tests.helpers import assert_one_error_line, batch, images_msg, ok, run_client, tensor, write_png


def attribute(stub, images: np.ndarray, **fields) -> AttributeResult:
    return from_proto(AttributeResult, stub.Attribute(pb.AttributeRequest(images=images_msg(images), **fields)))


def maps(result: AttributeResult) -> np.ndarray:
    return np.stack([a.map for a in result.attributions])


def test_the_served_version_and_the_training_weights_are_explained_and_nothing_changes(running, exported):
    manifest = Manifest.load(exported[0])
    engine = AttributionEngine(manifest)
    images, labels = batch(3, seed=4)
    served = attribute(running.stub, images, method="chefer")
    expected = engine.attribute(images, None, "chefer", weights=export_weights(manifest))
    np.testing.assert_allclose(maps(served), np.stack([a.map for a in expected]), rtol=1e-6, atol=1e-9)
    assert [a.target for a in served.attributions] == [a.target for a in expected]  # the predicted classes
    assert (served.method, served.model_version, served.grid, served.patch) == ("chefer", 0, (4, 4), (2, 2))

    before = running.engine.parameters()
    running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    training = attribute(running.stub, images, targets=[1, 2, 3], training_weights=True, heads=True)
    trained = running.engine.parameters()
    want = engine.attribute(images, [1, 2, 3], "rollout", heads=True, weights=trained)
    np.testing.assert_allclose(maps(training), np.stack([a.map for a in want]), rtol=1e-6, atol=1e-9)
    assert training.step == 1 and [a.label for a in training.attributions] == ["1", "2", "3"]
    assert training.attributions[0].heads.shape == (4, 4, 4, 4)  # blocks, heads, grid rows, grid columns
    assert not np.array_equal(maps(training), maps(attribute(running.stub, images, targets=[1, 2, 3])))

    version = running.stub.Publish(pb.PublishRequest()).version  # Predict (and Attribute) now serve step 1
    published = attribute(running.stub, images, targets=[1, 2, 3])
    np.testing.assert_allclose(maps(published), maps(training), rtol=1e-5, atol=1e-8)
    assert published.model_version == version == 1
    path = running.trainer.versions.model_path(version)
    again = engine.attribute(images, [1, 2, 3], "rollout", weights=published_weights(manifest, path))
    np.testing.assert_allclose(maps(published), np.stack([a.map for a in again]), rtol=1e-6, atol=1e-9)
    assert running.engine.step == 1  # nothing was trained by explaining
    assert all(np.array_equal(trained[n], v) for n, v in running.engine.parameters().items())
    assert any(not np.array_equal(before[n], trained[n]) for n in before)


BAD = {  # case -> (request fields, code, message)
    "method": (dict(method="saliency"), grpc.StatusCode.INVALID_ARGUMENT,
               "method: unknown attribution method 'saliency'; the methods are rollout, chefer, gradxinput"),
    "class": (dict(targets=[0, 10]), grpc.StatusCode.INVALID_ARGUMENT, "target: must be in [0, 10), got 10"),
    "count": (dict(targets=[1]), grpc.StatusCode.INVALID_ARGUMENT,
              "target: shape must be [2] (one per image), got [1]"),
    "heads": (dict(method="gradxinput", heads=True), grpc.StatusCode.INVALID_ARGUMENT,
              "heads: per-head maps need an attention method (rollout or chefer), not gradxinput"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_clear_status_and_change_nothing(running, case):
    fields, code, message = BAD[case]
    with pytest.raises(grpc.RpcError) as e:
        attribute(running.stub, batch(2)[0], **fields)
    assert (e.value.code(), e.value.details()) == (code, message)
    assert running.engine.step == 0


def test_bad_images_get_predicts_code_and_message(running):
    wrong = np.zeros((2, 1, 4, 16), np.float32)
    for call, request in ((running.stub.Attribute, pb.AttributeRequest), (running.stub.Predict, pb.PredictRequest)):
        with pytest.raises(grpc.RpcError) as e:
            call(request(images=images_msg(wrong)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "images: shape must be [batch, 1, 8, 8], got [2, 1, 4, 16]"


def test_a_predict_replica_explains_but_not_the_training_weights(serve, exported, tmp_path):
    replica = serve(role="predict")
    images = batch(2)[0]
    assert len(attribute(replica.stub, images, method="gradxinput").attributions) == 2
    with pytest.raises(grpc.RpcError) as e:
        attribute(replica.stub, images, training_weights=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == ("attribute with the training weights is not served by this replica (--role predict: "
                                 "inference only); send it to a trainer (--role train or all)")


def test_a_model_without_attention_has_input_x_gradient_only(serve, tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    folder = exporter.export(model=cnn, name="cnn", out=tmp_path / "artifacts", image_size=8, channels=1, mean=(0.5,),
                             std=(0.5,), class_names=["a", "b", "c"], source={"model": "a test's CNN"}, freeze=[],
                             optimizer="adamw", opset=17)
    server = serve(artifacts=folder)
    images = batch(2)[0]
    assert attribute(server.stub, images, method="gradxinput").attributions[0].map.shape == (8, 8)
    for method in ("rollout", "chefer"):
        with pytest.raises(grpc.RpcError) as e:
            attribute(server.stub, images, method=method)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "the model has no attention modules; only gradxinput works" in e.value.details(), e.value.details()


def test_http_and_the_client_library_answer_the_same_maps(running, tmp_path):
    images = batch(2)[0]
    expected = attribute(running.stub, images, method="chefer")
    with ViTClient(running.address) as client:
        assert np.array_equal(maps(client.attribute(images, method="chefer")), maps(expected))
    door = create_http_server(running.plane.settings.model_copy(update={"http_port": 0}), running.plane, Security())
    try:
        import urllib.request

        body = {"images": {"tensor": {"dtype": "FLOAT32", "shape": list(images.shape),
                                      "data": base64.b64encode(images.tobytes()).decode()}}, "method": "chefer"}
        request = urllib.request.Request(f"http://127.0.0.1:{door.port}/v1/attribute", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            document = json.loads(answer.read())
    finally:
        door.stop()
    first = document["attributions"][0]["map"]
    got = np.frombuffer(base64.b64decode(first["data"]), "<f4").reshape([int(d) for d in first["shape"]])
    np.testing.assert_array_equal(got, expected.attributions[0].map)


def test_the_cli_prints_the_maps_and_draws_the_overlay(running, tmp_path):
    files = [write_png(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    out = ok(run_client("--address", running.address, "attribute", *map(str, files), "--method", "chefer",
                        "--plot", str(tmp_path / "overlay.png"))).stdout
    assert out.startswith("chefer maps on a 4x4 grid of 2x2-pixel cells (model version 0)\n"), out
    assert out.count("strongest cells") == 3 and f"wrote {tmp_path / 'overlay.png'}" in out
    with Image.open(tmp_path / "overlay.png") as picture:
        assert picture.format == "PNG" and picture.size[0] >= 600
    document = json.loads(ok(run_client("--address", running.address, "--json", "attribute", str(files[0]),
                                        "--target", "7")).stdout)
    assert document["attributions"][0]["target"] == 7 and document["images"] == ["0.png"]
    np.savez(tmp_path / "batch.npz", images=batch(2)[0])
    npz = json.loads(ok(run_client("--address", running.address, "--json", "attribute", "--npz",
                                   str(tmp_path / "batch.npz"), "--method", "gradxinput")).stdout)
    assert len(npz["attributions"]) == 2 and npz["method"] == "gradxinput"
    line = assert_one_error_line(run_client("--address", running.address, "attribute", str(files[0]),
                                            "--target", "zebra"), code=1)
    assert line.startswith("error: --target zebra: not one of the model's classes (0, 1, 2,"), line
