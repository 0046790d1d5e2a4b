"""The client's dataclasses against the wire schema: every proto field has a client field and every client
field is on the wire (client.client.MESSAGES), and the one generic converter builds each of them right."""
from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import client.client as cc
from proto import vitserve_pb2 as pb
from proto.tensors import DTYPES

# The few client fields named differently from their proto field: (dataclass, client name) -> proto name.
RENAMES = {(cc.ModelInfo, "config"): "config_json"}

# PredictResult.predictions holds, per Prediction, its `top` ClassScores as plain tuples in this order.
PREDICTION_FIELDS = ["top"]
CLASS_SCORE_TUPLE = ["index", "label", "probability"]

# Messages the client reads without a dataclass of their own: the tensor becomes a numpy array, and
# Prediction/ClassScore become PredictResult.predictions' tuples (checked by test_prediction_tuples).
NO_DATACLASS = {pb.Tensor.DESCRIPTOR, pb.Prediction.DESCRIPTOR, pb.ClassScore.DESCRIPTOR}


def proto_name(cls: type, name: str) -> str:
    return RENAMES.get((cls, name), name)


def mismatches(cls: type, proto_fields: list[str]) -> list[str]:
    """What keeps dataclass `cls` and the proto fields `proto_fields` from matching one to one."""
    wired = [proto_name(cls, f.name) for f in dataclasses.fields(cls)]
    problems = [f"{cls.__name__} has no field for proto field {name}" for name in proto_fields if name not in wired]
    problems += [f"{cls.__name__}.{f.name} is not on the wire (no proto field {proto_name(cls, f.name)})"
                 for f in dataclasses.fields(cls) if proto_name(cls, f.name) not in proto_fields]
    return problems


PAIRS = list(cc.MESSAGES.items())


@pytest.mark.parametrize("cls, message", PAIRS, ids=[cls.__name__ for cls, _ in PAIRS])
def test_every_field_matches(cls, message):
    assert mismatches(cls, [f.name for f in message.DESCRIPTOR.fields]) == []


def test_the_check_catches_a_forgotten_proto_field():
    """A field added to the proto and not to the client fails the check (and a client-only field too)."""
    fields = [f.name for f in pb.GradientSummary.DESCRIPTOR.fields]
    assert mismatches(cc.GradientSummary, [*fields, "new_statistic"]) == [
        "GradientSummary has no field for proto field new_statistic"]
    assert mismatches(cc.GradientSummary, [f for f in fields if f != "sublayer"]) == [
        "GradientSummary.sublayer is not on the wire (no proto field sublayer)"]


@pytest.mark.parametrize("cls, message", PAIRS, ids=[cls.__name__ for cls, _ in PAIRS])
def test_renames_are_the_converters(cls, message):
    """The converter reads each field from the proto field this test expects (RENAMES, else the same name)."""
    assert {f.name: cc.wire_name(f) for f in dataclasses.fields(cls)} == {
        f.name: proto_name(cls, f.name) for f in dataclasses.fields(cls)}


def test_prediction_tuples():
    assert [f.name for f in pb.Prediction.DESCRIPTOR.fields] == PREDICTION_FIELDS
    assert [f.name for f in pb.ClassScore.DESCRIPTOR.fields] == CLASS_SCORE_TUPLE
    response = pb.PredictResponse(predictions=[pb.Prediction(top=[pb.ClassScore(index=3, label="3", probability=0.5)])])
    assert cc.from_proto(cc.PredictResult, response).predictions == [[(3, "3", 0.5)]]


def test_every_client_dataclass_has_its_message():
    dataclasses_here = {cls for _, cls in inspect.getmembers(cc, inspect.isclass)
                        if dataclasses.is_dataclass(cls) and cls.__module__ == cc.__name__}
    assert dataclasses_here == set(cc.MESSAGES)


def reachable(descriptor: Descriptor, seen: set) -> set:
    """`descriptor` and every message type its fields lead to (map entries aside)."""
    if descriptor in seen:
        return seen
    seen.add(descriptor)
    for f in descriptor.fields:
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            reachable(f.message_type, seen)
    return seen


def test_every_answer_of_the_service_has_a_dataclass():
    """Each RPC's response, and every message nested in one, is read into a client dataclass."""
    answers: set = set()
    for method in pb.DESCRIPTOR.services_by_name["VitServe"].methods:
        reachable(method.output_type, answers)
    schemas = {message.DESCRIPTOR for message in cc.MESSAGES.values()}
    assert {d.full_name for d in answers - NO_DATACLASS} == {d.full_name for d in schemas}


@pytest.mark.parametrize("cls, message", PAIRS, ids=[cls.__name__ for cls, _ in PAIRS])
def test_nested_messages_are_nested_dataclasses(cls, message):
    """A message field's type hint names the dataclass of that message (or, for a dict, has one in MESSAGES)."""
    hints = typing.get_type_hints(cls)
    schema = {m.DESCRIPTOR: c for c, m in cc.MESSAGES.items()}
    for f in dataclasses.fields(cls):
        descriptor = message.DESCRIPTOR.fields_by_name[proto_name(cls, f.name)]
        if descriptor.message_type is None or descriptor.message_type in NO_DATACLASS:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            assert typing.get_origin(hints[f.name]) is dict, f.name
            continue
        hint = hints[f.name]
        if descriptor.is_repeated:
            assert typing.get_origin(hint) in (list, tuple), f.name
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is dict:
            assert descriptor.message_type in schema, f.name
        else:
            assert schema[descriptor.message_type] is hint, f.name


# ---------------------------------------------------------------- the converter on filled messages

def filled(descriptor: Descriptor, message=None):
    """A message with every field set to a value that is not its default (two entries for repeated fields)."""
    message = message or getattr(pb, descriptor.name)()
    if descriptor is pb.Tensor.DESCRIPTOR:
        return pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=np.array([1.5, -2.0], "<f4").tobytes())
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(message, f.name).update({"torch": "2.0", "onnx": "1.17"})
        elif f.message_type is not None and f.is_repeated:
            getattr(message, f.name).extend([filled(f.message_type), filled(f.message_type)])
        elif f.message_type is not None:
            getattr(message, f.name).CopyFrom(filled(f.message_type))
        else:
            value = scalar(f)
            if f.is_repeated:
                getattr(message, f.name).extend([value, value])
            else:
                setattr(message, f.name, value)
    return message


def scalar(f: FieldDescriptor):
    if f.name == "config_json":
        return json.dumps({"dim": 64, "depth": 4})
    if f.enum_type is not None:
        return pb.FLOAT32
    if f.type == FieldDescriptor.TYPE_BOOL:
        return True
    if f.type == FieldDescriptor.TYPE_STRING:
        return f"{f.name}-value"
    if f.type == FieldDescriptor.TYPE_BYTES:
        return b"\x01"
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return f.number + 0.485
    return f.number + 1


def expected(f: FieldDescriptor, value):
    """What the client holds for a scalar proto value."""
    if f.name == "config_json":
        return json.loads(value)
    if f.enum_type is not None:
        return f.enum_type.values_by_number[value].name
    if f.type == FieldDescriptor.TYPE_FLOAT:
        return float(f"{value:.7g}")  # float32: the short decimal it was written as
    return value


def check(record, message) -> None:
    """Every field of `record` holds its proto field's value."""
    cls = type(record)
    for f in dataclasses.fields(cls):
        descriptor = message.DESCRIPTOR.fields_by_name[proto_name(cls, f.name)]
        value, wire = getattr(record, f.name), getattr(message, descriptor.name)
        check_value(descriptor, value, wire, where=f"{cls.__name__}.{f.name}")


def check_value(descriptor: FieldDescriptor, value, wire, where: str) -> None:
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        assert value == dict(wire), where
    elif descriptor.message_type is pb.Prediction.DESCRIPTOR:
        assert value == [[(s.index, s.label, s.probability) for s in p.top] for p in wire], where
    elif descriptor.message_type is pb.Tensor.DESCRIPTOR:
        np.testing.assert_array_equal(value, [1.5, -2.0])
    elif descriptor.is_repeated:
        assert len(value) == len(wire) == 2, where
        for v, w in zip(value, wire):
            check_value_one(descriptor, v, w, where)
    else:
        check_value_one(descriptor, value, wire, where)


def check_value_one(descriptor: FieldDescriptor, value, wire, where: str) -> None:
    if descriptor.message_type is None:
        assert value == expected(descriptor, wire), where
        return
    if isinstance(value, dict):  # ModelInfo.preprocessing and .parameters: the fields of the message
        assert list(value) == [f.name for f in descriptor.message_type.fields], where
        value = cc._SCHEMAS[descriptor.message_type](**value)
    check(value, wire)


@pytest.mark.parametrize("cls, message", PAIRS, ids=[cls.__name__ for cls, _ in PAIRS])
def test_converter_reads_every_field(cls, message):
    proto = filled(message.DESCRIPTOR)
    record = cc.from_proto(cls, proto)
    check(record, proto)
    json.dumps(record.as_dict())  # and it is JSON all the way down


def test_model_info_shapes():
    """The client's shape of ModelInfo: dicts for config, preprocessing and parameters, tuples for shapes."""
    info = cc.from_proto(cc.ModelInfo, pb.ModelInfo(
        name="m", config_json='{"dim": 64}', input_shape=[-1, 3, 32, 32], input_dtype=pb.FLOAT32,
        preprocessing=pb.Preprocessing(height=32, width=32, channels=3, mean=[0.485, 0.456, 0.406],
                                       std=[0.229, 0.224, 0.225]),
        parameters=[pb.ParameterInfo(name="transformer.layers.1.0.fn.to_qkv.weight", shape=[192, 64],
                                     trainable=True, block=1, sublayer="attention.qkv")],
        class_names=["a", "b"]))
    assert info.config == {"dim": 64}
    assert info.input_shape == (-1, 3, 32, 32)
    assert info.input_dtype == "FLOAT32"
    assert info.preprocessing == {"height": 32, "width": 32, "channels": 3, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225], "resize_shorter": 0,
                                  "interpolation": "bilinear"}  # an older server's message names no filter
    assert info.parameters == [{"name": "transformer.layers.1.0.fn.to_qkv.weight", "shape": (192, 64),
                                "trainable": True, "block": 1, "sublayer": "attention.qkv"}]
    assert info.num_classes == 2
    assert cc.from_proto(cc.ModelInfo, pb.ModelInfo()).config == {}  # no config_json: an empty dict


def test_unset_messages_are_none():
    assert cc.from_proto(cc.OptimizerState, pb.OptimizerState(optimizer="sgd")).schedule is None
    assert cc.from_proto(cc.PredictResult, pb.PredictResponse()).logits is None
    explanation = cc.from_proto(cc.Explanation, pb.ExplainGradientsResponse(
        parameters=[pb.ParameterGradientPath(name="w", qkv_parts=[pb.QkvPartGradient(part="q")])]))
    assert explanation.loss is None and explanation.loss_gradient is None
    assert explanation.parameter("w").gradient_node is None
    assert explanation.parameter("w").qkv_parts[0].gradient_node is None
    with pytest.raises(KeyError):
        explanation.parameter("other")


def test_train_step_result():
    result = cc.from_proto(cc.TrainStepResult, pb.TrainStepResponse(
        loss=2.0, step=3, applied=False, accumulated_batches=2,
        gradients=[pb.GradientSummary(name="mlp_head.1.weight", shape=[10, 64], block=-1, sublayer="head")],
        attention=[pb.QkvGradient(name="q", block=0, heads=2, q_head_norms=[1.0, 2.0])]))
    (g,) = result.gradients
    assert (g.shape, g.block, g.sublayer) == ((10, 64), -1, "head")
    assert result.attention[0].q_head_norms == (1.0, 2.0)
    assert result.status == "accumulated (2 batches)"
    assert result.as_dict()["gradients"][0]["shape"] == [10, 64]


def test_checkpoint_list_unpacks_like_a_pair():
    checkpoints, latest = cc.from_proto(cc.CheckpointList, pb.ListCheckpointsResponse(
        checkpoints=[pb.CheckpointInfo(name="a", step=1)], latest="a"))
    assert [c.name for c in checkpoints] == ["a"] and latest == "a"


# ---------------------------------------------------------------- tensors: the one dtype table

@pytest.mark.parametrize("enum", list(DTYPES), ids=[pb.DataType.Name(e) for e in DTYPES])
def test_tensor_round_trip(enum):
    array = np.arange(6).reshape(2, 3).astype(DTYPES[enum].newbyteorder("="))
    tensor = cc.tensor_to_proto(array)
    assert tensor.dtype == enum and list(tensor.shape) == [2, 3]
    back = cc.tensor_from_proto(tensor)
    assert back.dtype == array.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, array)


def test_tensor_big_endian_goes_little():
    tensor = cc.tensor_to_proto(np.array([1.0, 2.0], dtype=">f4"))
    assert tensor.dtype == pb.FLOAT32 and tensor.data == np.array([1.0, 2.0], dtype="<f4").tobytes()


def test_tensor_errors():
    with pytest.raises(ValueError, match="unsupported tensor dtype complex64"):
        cc.tensor_to_proto(np.zeros(2, dtype=np.complex64))
    with pytest.raises(ValueError, match="unsupported dtype DATA_TYPE_UNSPECIFIED"):
        cc.tensor_from_proto(pb.Tensor(shape=[1], data=b"\0" * 4))
    with pytest.raises(ValueError, match=r"needs 8 bytes, got 4"):
        cc.tensor_from_proto(pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b"\0" * 4))


def test_labels_must_be_integers():
    """A float label array would be truncated by the INT64 conversion, so the client refuses it; a count
    that does not match the images is the server's to reject."""
    with pytest.raises(ValueError, match="integer class indices"):
        cc.labels_to_proto(np.array([1.5, 2.0]))
    assert cc.labels_to_proto([1, 2, 3]).dtype == pb.INT64
