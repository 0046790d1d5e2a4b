"""The client reads the server's own records: its public names are the classes of proto/records/ (no mirror), the
one converter gives them the shapes users meet (tuples, dicts, None for unset messages, JSON documents), and the
one tensor codec (proto/tensors.py) carries arrays both ways."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import client
import client.client as cc
from engine.errors import InvalidArgument
from proto import vitserve_pb2 as pb
from proto.convert import RECORDS, from_proto
from proto.tensors import DTYPES, DTYPES_BY_NAME, tensor_from_proto, tensor_to_proto
from server.decode import decode_tensor


def test_the_client_names_the_records_themselves():
    """Every record class the client exports is a class of the one table, not a copy of it."""
    exported = [getattr(client, name) for name in client.__all__]
    records = [value for value in exported if dataclasses.is_dataclass(value)]
    assert records and all(value in RECORDS for value in records)
    assert {client.AttentionModule, client.UnplacedParameter, client.TrainStepResult} <= set(RECORDS)
    assert client.tensor_to_proto is tensor_to_proto and client.tensor_from_proto is tensor_from_proto


def test_model_info_shapes():
    """ModelInfo: the config as a dict, records for preprocessing and parameters, tuples for shapes, and the JSON
    document users get from `info --json`."""
    info = from_proto(client.ModelInfo, pb.ModelInfo(
        name="m", config_json='{"dim": 64}', input_shape=[-1, 3, 32, 32], input_dtype=pb.FLOAT32,
        preprocessing=pb.Preprocessing(height=32, width=32, channels=3, mean=[0.485, 0.456, 0.406],
                                       std=[0.229, 0.224, 0.225]),
        parameters=[pb.ParameterInfo(name="transformer.layers.1.0.fn.to_qkv.weight", shape=[192, 64],
                                     trainable=True, block=1, sublayer="attention.qkv")],
        attention=[pb.AttentionModule(name="qkv", weights=["qkv"] * 3, fused=True)],
        class_names=["a", "b"]))
    assert info.config == {"dim": 64}
    assert info.input_shape == (-1, 3, 32, 32) and info.input_dtype == "FLOAT32"
    assert info.preprocessing == client.Preprocessing(32, 32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert info.parameters == [client.ParameterInfo("transformer.layers.1.0.fn.to_qkv.weight", (192, 64), True, 1,
                                                    "attention.qkv")]
    assert info.num_classes == 2 and info.attention[0].fused
    doc = info.as_dict()
    assert list(doc)[:2] == ["name", "config"] and doc["config"] == {"dim": 64}
    assert doc["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and doc["attention"][0]["fused"] is True
    assert doc["parameters"][0]["shape"] == [192, 64]
    assert from_proto(client.ModelInfo, pb.ModelInfo()).config == {}  # no config_json: an empty dict


def test_predictions_unpack_and_print_as_before():
    response = pb.PredictResponse(predictions=[pb.Prediction(top=[pb.ClassScore(index=3, label="3", probability=0.5),
                                                                  pb.ClassScore(index=1, label="1", probability=0.25)])],
                                  model_version=2)
    result = from_proto(client.PredictResult, response)
    (top,) = result.predictions
    assert [tuple(score) for score in top] == [(3, "3", 0.5), (1, "1", 0.25)] and len(top) == 2
    index, label, probability = top[0]
    assert (index, label, probability) == (3, "3", 0.5) and top[1][2] == 0.25
    assert result.as_dict() == {"predictions": [[[3, "3", 0.5], [1, "1", 0.25]]], "logits": None, "model_version": 2}


def test_unset_messages_are_none():
    explanation = from_proto(client.Explanation, pb.ExplainGradientsResponse(
        parameters=[pb.ParameterGradientPath(name="w", qkv_parts=[pb.QkvPartGradient(part="q")])]))
    assert explanation.loss is None and explanation.loss_gradient is None
    assert explanation.parameter("w").gradient_node is None
    assert explanation.parameter("w").qkv_parts[0].gradient_node is None
    with pytest.raises(KeyError):
        explanation.parameter("other")


def test_train_step_result():
    result = from_proto(client.TrainStepResult, pb.TrainStepResponse(
        loss=2.0, step=3, applied=False, accumulated_batches=2,
        gradients=[pb.GradientSummary(name="mlp_head.1.weight", shape=[10, 64], block=-1, sublayer="head")],
        attention=[pb.QkvGradient(name="q", block=0, heads=2, q_head_norms=[1.0, 2.0])]))
    (g,) = result.gradients
    assert (g.shape, g.block, g.sublayer) == ((10, 64), -1, "head")
    assert result.attention[0].q_head_norms == (1.0, 2.0)
    assert result.status == "accumulated (2 batches)"
    assert result.as_dict()["gradients"][0]["shape"] == [10, 64]


def test_eval_result_document_keeps_accuracy():
    result = from_proto(client.EvalResult, pb.EvalStepResponse(loss=0.5, accuracy=0.75, correct=3, count=4, step=9))
    assert result.accuracy == 0.75
    assert json.dumps(result.as_dict()) == '{"loss": 0.5, "accuracy": 0.75, "correct": 3, "count": 4, "step": 9}'


def test_checkpoint_list_unpacks_like_a_pair():
    checkpoints, latest = from_proto(client.CheckpointList, pb.ListCheckpointsResponse(
        checkpoints=[pb.CheckpointInfo(name="a", step=1)], latest="a"))
    assert [c.name for c in checkpoints] == ["a"] and latest == "a"


# ---------------------------------------------------------------- tensors: the one codec

@pytest.mark.parametrize("enum", list(DTYPES), ids=[pb.DataType.Name(e) for e in DTYPES])
def test_tensor_round_trip(enum):
    array = np.arange(6).reshape(2, 3).astype(DTYPES[enum].newbyteorder("="))
    tensor = tensor_to_proto(array)
    assert tensor.dtype == enum and list(tensor.shape) == [2, 3]
    back = tensor_from_proto(tensor)
    assert back.dtype == array.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, array)
    view = decode_tensor("x", pb.DataType.Name(enum), tensor.shape, tensor.data)  # the server's read-only view
    assert not view.flags.writeable and np.array_equal(view, array)


def test_one_dtype_table_covers_the_enum():
    named = {v.name for v in pb.DataType.DESCRIPTOR.values if v.number != 0}
    assert {pb.DataType.Name(e) for e in DTYPES} == named == set(DTYPES_BY_NAME)


def test_tensor_big_endian_goes_little():
    tensor = tensor_to_proto(np.array([1.0, 2.0], dtype=">f4"))
    assert tensor.dtype == pb.FLOAT32 and tensor.data == np.array([1.0, 2.0], dtype="<f4").tobytes()


def test_tensor_errors_are_the_servers_messages():
    """The codec says what is wrong; the server's decoder names the field and makes it an InvalidArgument."""
    with pytest.raises(ValueError, match="unsupported tensor dtype complex64"):
        tensor_to_proto(np.zeros(2, dtype=np.complex64))
    with pytest.raises(ValueError, match="^dtype DATA_TYPE_UNSPECIFIED is not supported"):
        tensor_from_proto(pb.Tensor(shape=[1], data=b"\0" * 4))
    with pytest.raises(ValueError, match=r"^4 bytes do not match shape \[2\] of FLOAT32 \(8 bytes expected\)$"):
        tensor_from_proto(pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match=r"^labels: shape \[-1\] has a negative dimension$"):
        decode_tensor("labels", "INT64", [-1], b"")
    with pytest.raises(InvalidArgument, match=r"^images: dtype 7 is not supported \(use one of FLOAT32, "):
        decode_tensor("images", "7", [1], b"\0")


def test_labels_must_be_integers():
    """A float label array would be truncated by the INT64 conversion, so the client refuses it; a count
    that does not match the images is the server's to reject."""
    with pytest.raises(ValueError, match="integer class indices"):
        cc.labels_to_proto(np.array([1.5, 2.0]))
    assert cc.labels_to_proto([1, 2, 3]).dtype == pb.INT64
