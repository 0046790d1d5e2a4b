"""One schema per record, server side: every record maps to its proto message field for field, both ways.

server/convert.py converts records to messages by name; a proto field with no counterpart on the record
(or a record field the wire does not carry) fails here, not in production.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.train.gradients import GradientSummary
from engine.manifest import Parameter
from engine.train.schedule import LinearSchedule
from engine.store.files import CheckpointInfo, CheckpointList
from proto import vitserve_pb2 as pb
from proto.tensors import DTYPES
from server.convert import RECORDS, from_proto, to_proto
from server.decode import DTYPES_BY_NAME, decode_tensor, encode_tensor


def attributes(record_type: type) -> set[str]:
    """Dataclass fields and properties: what to_proto can read."""
    fields = {f.name for f in dataclasses.fields(record_type)}
    return fields | {n for n in dir(record_type) if isinstance(getattr(record_type, n, None), property)}


@pytest.mark.parametrize("record_type", list(RECORDS), ids=lambda t: t.__name__)
def test_every_proto_field_has_a_counterpart_on_its_record(record_type):
    message = RECORDS[record_type]
    missing = [f.name for f in message.DESCRIPTOR.fields if f.name not in attributes(record_type)]
    assert not missing, f"{message.DESCRIPTOR.full_name} fields with no {record_type.__name__} counterpart: {missing}"


@pytest.mark.parametrize("record_type", list(RECORDS), ids=lambda t: t.__name__)
def test_every_record_field_is_on_the_wire(record_type):
    message = RECORDS[record_type]
    wire = set(message.DESCRIPTOR.fields_by_name)
    extra = [f.name for f in dataclasses.fields(record_type) if f.name not in wire]
    assert not extra, f"{record_type.__name__} fields that {message.DESCRIPTOR.full_name} does not carry: {extra}"


def test_every_server_message_with_a_record_is_in_the_table():
    """The responses the servicer builds from records are all converted through RECORDS."""
    converted = {m.DESCRIPTOR.full_name for m in RECORDS.values()}
    for name in ("TrainStepResponse", "EvalStepResponse", "OptimizerState", "CheckpointInfo",
                 "ListCheckpointsResponse", "ModelVersion", "ExplainGradientsResponse", "ModelInfo"):
        assert f"vitserve.v1.{name}" in converted


def test_nested_records_repeated_fields_and_properties_convert():
    summary = GradientSummary(name="w", shape=(3, 2), l2_norm=1.5, mean=0.1, std=0.2, min=-1.0, max=1.0, max_abs=1.0,
                              zero_fraction=0.25, nonfinite_count=0, param_norm=2.0, update_ratio=0.01, block=3,
                              sublayer="attention.qkv")
    message = to_proto(summary)
    assert isinstance(message, pb.GradientSummary)
    assert list(message.shape) == [3, 2] and message.block == 3 and message.sublayer == "attention.qkv"
    assert message.l2_norm == 1.5 and message.zero_fraction == 0.25

    listing = to_proto(CheckpointList((CheckpointInfo("a", 1, 10.0, 5, "manual"), CheckpointInfo("b", 2, 11.0, 6, "auto"))))
    assert [c.name for c in listing.checkpoints] == ["a", "b"] and listing.latest == "b"  # a property on the wire
    assert to_proto(CheckpointList(())).latest == ""

    param = to_proto(Parameter("blocks.0.w", (4,), False, 0, "feedforward"))
    assert (param.name, list(param.shape), param.trainable, param.block, param.sublayer) == \
        ("blocks.0.w", [4], False, 0, "feedforward")


def test_from_proto_is_the_inverse_for_a_request_record():
    schedule = from_proto(pb.LinearSchedule(peak_lr=2e-3, warmup_steps=3, decay_steps=7, end_lr=1e-4), LinearSchedule)
    assert schedule == LinearSchedule(2e-3, 3, 7, 1e-4)
    assert to_proto(schedule) == pb.LinearSchedule(peak_lr=2e-3, warmup_steps=3, decay_steps=7, end_lr=1e-4)


def test_one_dtype_table_covers_the_enum():
    """proto/tensors.py maps every DataType but UNSPECIFIED; the server's by-name view is derived from it."""
    named = {v.name for v in pb.DataType.DESCRIPTOR.values if v.number != 0}
    assert {pb.DataType.Name(e) for e in DTYPES} == named == set(DTYPES_BY_NAME)
    for enum, dtype in DTYPES.items():
        array = np.arange(6, dtype=dtype).reshape(2, 3)
        message = encode_tensor(array)
        assert message.dtype == enum
        assert np.array_equal(decode_tensor("x", pb.DataType.Name(enum), message.shape, message.data), array)
