"""Server roles: an inference-only replica (--role predict) from the inference graph and the manifest alone."""
from __future__ import annotations

import json
import shutil

import grpc
import pytest

from engine.manifest import INFERENCE_MODEL, MANIFEST
from proto import open_inference_pb2 as v2
from proto import vitserve_pb2 as pb
from server.kserve import METHODS
from tests.helpers import MODEL, batch, images_msg, run_client, start_server, tensor

TRAINING_CALLS = {  # VitServe method -> (request, the words naming it in the refusal)
    "TrainStep": (lambda: pb.TrainStepRequest(images=images_msg(batch(2)[0]), labels=tensor(batch(2)[1])),
                  "train step"),
    "EvalStep": (lambda: pb.EvalStepRequest(images=images_msg(batch(2)[0]), labels=tensor(batch(2)[1])), "eval step"),
    "SaveCheckpoint": (lambda: pb.SaveCheckpointRequest(name="x"), "save checkpoint"),
    "ListCheckpoints": (pb.ListCheckpointsRequest, "list checkpoints"),
    "RestoreCheckpoint": (lambda: pb.RestoreCheckpointRequest(name="x"), "restore checkpoint"),
    "Publish": (pb.PublishRequest, "publish"),
    "ExplainGradients": (pb.ExplainGradientsRequest, "explain"),
    "GetOptimizer": (pb.GetOptimizerRequest, "optimizer"),
    "HeadImportance": (lambda: pb.HeadImportanceRequest(images=images_msg(batch(2)[0]), labels=tensor(batch(2)[1])),
                       "head importance"),
    "GetGradientHistory": (pb.GradientHistoryRequest, "gradient history"),
}


@pytest.fixture
def inference_only(exported, tmp_path):
    """A copy of the export with only what a predict replica needs: manifest.json and inference.onnx."""
    folder = tmp_path / "predict-artifacts"
    folder.mkdir()
    for name in (MANIFEST, INFERENCE_MODEL):
        shutil.copy(exported[0] / name, folder / name)
    return folder


def test_a_predict_replica_serves_inference_from_the_inference_graph_alone(serve, inference_only):
    server = serve(artifacts=inference_only, role="predict")
    images, _ = batch(3)
    answer = server.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
    assert len(answer.predictions) == 3 and answer.model_version == 0
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.role, info.step, info.name) == ("predict", 0, MODEL)
    metadata = server.channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata",
                                          request_serializer=METHODS["ServerMetadata"][0].SerializeToString,
                                          response_deserializer=METHODS["ServerMetadata"][1].FromString)
    assert metadata(v2.ServerMetadataRequest()).name == "vitserve-predict"
    for method, (request, words) in TRAINING_CALLS.items():
        with pytest.raises(grpc.RpcError) as e:
            getattr(server.stub, method)(request())
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, method
        assert e.value.details() == (f"{words} is not served by this replica (--role predict: inference only); "
                                     "send it to a trainer (--role train or all)"), method
    server.stop()
    assert sorted(p.name for p in inference_only.iterdir()) == sorted([MANIFEST, INFERENCE_MODEL])  # wrote nothing


def test_a_predict_replica_serves_the_newest_version_a_trainer_published(serve, exported, inference_only, tmp_path):
    data = tmp_path / "shared"
    trainer = serve(data_dir=data, role="train")
    assert trainer.stub.GetModelInfo(pb.GetModelInfoRequest()).role == "train"
    images, labels = batch(4)
    trainer.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    assert trainer.stub.Publish(pb.PublishRequest()).version == 1
    expected = trainer.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
    replica = serve(artifacts=inference_only, data_dir=data, role="predict")
    answer = replica.stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True))
    assert answer.model_version == 1 and answer.logits.data == expected.logits.data


def test_a_predict_replica_needs_no_training_artifacts_and_says_its_role(inference_only):
    server = start_server("--artifacts", str(inference_only), "--port", "0", "--role", "predict")
    try:
        info = json.loads(run_client("--address", server.address, "--json", "info").stdout)
        assert info["role"] == "predict" and info["step"] == 0
        text = run_client("--address", server.address, "info").stdout
        assert "role            predict (inference only)" in text
    finally:
        server.stop()


def test_the_default_role_needs_the_training_artifacts(inference_only):
    from tests.helpers import assert_one_error_line, run_server_to_exit

    result = run_server_to_exit("--artifacts", str(inference_only), "--port", "0")
    line = assert_one_error_line(result, 2)
    assert line == f"error: artifact {inference_only}/gradient_model.onnx is missing: re-run the export"


def test_an_unknown_role_is_one_error_line(exported):
    from tests.helpers import assert_one_error_line, clean_env, run_server_to_exit

    line = assert_one_error_line(run_server_to_exit("--artifacts", str(exported[0]), "--role", "nope"), 2)
    assert line.startswith("error: argument --role: invalid choice: 'nope' (choose from ")
    line = assert_one_error_line(run_server_to_exit("--artifacts", str(exported[0]),
                                                    env=clean_env(VITSERVE_ROLE="nope")), 2)
    assert line.startswith("error: VITSERVE_ROLE='nope'")
