"""One schema: every wire record (proto/records/) against its message in the one table (proto/convert.py RECORDS),
field for field and both ways, and the one converter on every record.

A proto field with no counterpart on its record (or a record field the wire does not carry) fails here, not in
production; so does a message of the service's answers that no record reads.
"""
from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from proto import open_inference_pb2 as v2
from proto import vitserve_pb2 as pb
from proto.convert import RECORDS, from_proto, to_proto
from proto.records.model import ModelInfo, Parameter, PredictResult
from proto.records.training import CheckpointInfo, CheckpointList, GradientSummary, LinearSchedule, OptimizerState

# Message fields a record derives from its other fields (a property, written by to_proto and never read back),
# and why. Everything else on the wire is a field of the record.
DERIVED = {
    ("QkvLayout", "fused"): "one weight named three times",
    ("EvalResult", "accuracy"): "correct / count",
    ("CheckpointList", "latest"): "the newest intact checkpoint",
    ("InferStatistics", "cache_hit"): "no response cache: always zero",
    ("InferStatistics", "cache_miss"): "no response cache: always zero",
}
# The one message of the service's answers that is not a record: a tensor is a numpy array (proto/tensors.py).
NOT_RECORDS = {pb.Tensor.DESCRIPTOR}
PAIRS = list(RECORDS.items())
IDS = [record.__name__ for record in RECORDS]


def mismatches(record: type, message_fields: list[str]) -> list[str]:
    """What keeps `record` and a message with `message_fields` from matching one to one (DERIVED aside)."""
    fields = [f.name for f in dataclasses.fields(record)]
    problems = [f"{record.__name__} has no field for proto field {name}" for name in message_fields
                if name not in fields and (record.__name__, name) not in DERIVED]
    problems += [f"{record.__name__}.{name} is not on the wire" for name in fields if name not in message_fields]
    return problems


@pytest.mark.parametrize("record, message", PAIRS, ids=IDS)
def test_every_field_matches(record, message):
    assert mismatches(record, [f.name for f in message.DESCRIPTOR.fields]) == []


def test_the_check_catches_a_forgotten_field():
    """A field added to the proto and not to the record fails the check, and a record-only field too."""
    fields = [f.name for f in pb.GradientSummary.DESCRIPTOR.fields]
    assert mismatches(GradientSummary, [*fields, "new_statistic"]) == [
        "GradientSummary has no field for proto field new_statistic"]
    assert mismatches(GradientSummary, [f for f in fields if f != "sublayer"]) == [
        "GradientSummary.sublayer is not on the wire"]


def test_derived_fields_are_properties_on_the_wire():
    by_name = {record.__name__: (record, message) for record, message in RECORDS.items()}
    for (name, field), _ in DERIVED.items():
        record, message = by_name[name]
        assert isinstance(getattr(record, field), property), (name, field)
        assert field in message.DESCRIPTOR.fields_by_name, (name, field)


def reachable(descriptor: Descriptor, seen: set) -> set:
    """`descriptor` and every message type its fields lead to (map entries aside)."""
    if descriptor not in seen:
        seen.add(descriptor)
        for f in descriptor.fields:
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                reachable(f.message_type, seen)
    return seen


def test_every_answer_is_a_record():
    """Each VitServe response, every message nested in one, and the v2 answers built from records have their record."""
    answers: set = set()
    for method in pb.DESCRIPTOR.services_by_name["VitServe"].methods:
        reachable(method.output_type, answers)
    for message in (v2.ModelStatisticsResponse, v2.RepositoryIndexResponse):
        reachable(message.DESCRIPTOR, answers)
    tabled = {message.DESCRIPTOR for message in RECORDS.values()}
    assert {d.full_name for d in answers - NOT_RECORDS} == {d.full_name for d in tabled}
    assert len(tabled) == len(RECORDS)  # one record per message


@pytest.mark.parametrize("record, message", PAIRS, ids=IDS)
def test_nested_messages_are_nested_records(record, message):
    """A message field's type hint names that message's record (a Tensor: an array; a map: a dict)."""
    hints = typing.get_type_hints(record)
    record_of = {m.DESCRIPTOR: r for r, m in RECORDS.items()}
    for f in dataclasses.fields(record):
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        hint = hints[f.name]
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            assert typing.get_origin(hint) is dict, f.name
            continue
        if descriptor.is_repeated:
            assert typing.get_origin(hint) in (list, tuple), f.name
            hint = typing.get_args(hint)[0]
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # X | None -> X
        expected = np.ndarray if descriptor.message_type is pb.Tensor.DESCRIPTOR else record_of[descriptor.message_type]
        assert hint is expected, f.name


# ---------------------------------------------------------------- the converter on every record

def fill(message):
    """`message` with every field set to a value that is not its default (two entries for repeated fields)."""
    for f in message.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(message, f.name).update({"torch": "2.0", "onnx": "1.17"})
        elif f.message_type is pb.Tensor.DESCRIPTOR:
            getattr(message, f.name).CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[2],
                                                        data=np.array([1.5, -2.0], "<f4").tobytes()))
        elif f.message_type is not None and f.is_repeated:
            for _ in range(2):
                fill(getattr(message, f.name).add())
        elif f.message_type is not None:
            fill(getattr(message, f.name))
        elif f.is_repeated:
            getattr(message, f.name).extend([scalar(f)] * 2)
        else:
            setattr(message, f.name, scalar(f))
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
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return f.number + 0.485
    return f.number + 1


def without_derived(message, record: type):
    """The message with the DERIVED fields of its record (and of the records nested in it) cleared."""
    message = type(message).FromString(message.SerializeToString())
    for f, value in message.ListFields():
        if (record.__name__, f.name) in DERIVED:
            message.ClearField(f.name)
    for f in message.DESCRIPTOR.fields:
        if f.message_type is None or f.message_type.GetOptions().map_entry or f.message_type is pb.Tensor.DESCRIPTOR:
            continue
        nested_record = next(r for r, m in RECORDS.items() if m.DESCRIPTOR is f.message_type)
        if f.is_repeated:
            values = [without_derived(v, nested_record) for v in getattr(message, f.name)]
            message.ClearField(f.name)
            getattr(message, f.name).extend(values)
        elif message.HasField(f.name):
            getattr(message, f.name).CopyFrom(without_derived(getattr(message, f.name), nested_record))
    return message


@pytest.mark.parametrize("record, message", PAIRS, ids=IDS)
def test_every_field_survives_the_round_trip(record, message):
    """message -> record -> message gives the message back (derived fields recomputed), and every record's
    document is JSON."""
    proto = fill(message())
    value = from_proto(record, proto)
    assert isinstance(value, record)
    again = to_proto(value)
    assert without_derived(again, record) == without_derived(proto, record)
    json.dumps(value.as_dict())


def test_records_convert_with_nested_records_repeated_fields_and_properties():
    summary = GradientSummary(name="w", shape=(3, 2), l2_norm=1.5, mean=0.1, std=0.2, min=-1.0, max=1.0, max_abs=1.0,
                              zero_fraction=0.25, nonfinite_count=0, param_norm=2.0, update_ratio=0.01, block=3,
                              sublayer="attention.qkv")
    message = to_proto(summary)
    assert isinstance(message, pb.GradientSummary)
    assert list(message.shape) == [3, 2] and message.block == 3 and message.sublayer == "attention.qkv"
    assert from_proto(GradientSummary, message) == summary

    listing = to_proto(CheckpointList((CheckpointInfo("a", 1, 10.0, 5, "manual"), CheckpointInfo("b", 2, 11.0, 6, "auto"),
                                       CheckpointInfo("c", 3, 12.0, 0, "auto", problem="damaged"))))
    assert [c.name for c in listing.checkpoints] == ["a", "b", "c"] and listing.latest == "b"  # a property on the wire
    assert to_proto(CheckpointList(())).latest == ""

    param = to_proto(Parameter("blocks.0.w", (4,), False, 0, "feedforward"))
    assert (param.name, list(param.shape), param.trainable, param.block, param.sublayer) == \
        ("blocks.0.w", [4], False, 0, "feedforward")


def test_reading_follows_the_record_shape():
    """Enums become names, float32 values the short decimals they were written as, unset messages None."""
    info = from_proto(ModelInfo, pb.ModelInfo(input_dtype=pb.FLOAT32, preprocessing=pb.Preprocessing(
        height=1, width=1, channels=1, mean=[0.485], std=[0.229]), input_shape=[-1, 1, 8, 8]))
    assert info.input_dtype == "FLOAT32" and info.input_shape == (-1, 1, 8, 8)
    assert info.preprocessing.mean == (0.485,) and info.preprocessing.std == (0.229,)
    assert info.preprocessing.interpolation == "bilinear"  # an older server's message names no filter
    assert to_proto(info).input_dtype == pb.FLOAT32
    assert from_proto(OptimizerState, pb.OptimizerState(optimizer="sgd")).schedule is None
    assert from_proto(PredictResult, pb.PredictResponse()).logits is None
    assert not to_proto(OptimizerState("sgd", 0.1, None, 0, 0.0, 0, 1)).HasField("schedule")


def test_a_request_record_reads_back():
    schedule = from_proto(LinearSchedule, pb.LinearSchedule(peak_lr=2e-3, warmup_steps=3, decay_steps=7, end_lr=1e-4))
    assert schedule == LinearSchedule(2e-3, 3, 7, 1e-4)
    assert to_proto(schedule) == pb.LinearSchedule(peak_lr=2e-3, warmup_steps=3, decay_steps=7, end_lr=1e-4)
