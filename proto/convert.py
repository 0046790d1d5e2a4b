"""Records <-> messages: the one converter between the wire records (proto/records/) and their proto messages, for
the server (records -> answers, requests -> records) and the client (answers -> records).

RECORDS is the one table, record class -> message class. A record's fields are its message's fields, matched by
name (tests/test_schema.py checks every pair both ways); a message field that is a property of the record is
derived from the other fields: written from the property, never read back. Conversion is generic: nested records
are nested messages, sequences repeated fields, dicts maps, None an unset message, numpy arrays Tensors
(proto/tensors.py), str values of enum fields their names; float32 values are read as the shortest decimal that
is the same float32 (0.485, not 0.48500001430511475).
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing
from typing import Any, Callable, TypeVar, Union

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from proto import open_inference_pb2 as v2
from proto import vitserve_pb2 as pb
from proto.records import explain, model, training
from proto.records import v2 as kserve
from proto.tensors import tensor_from_proto, tensor_to_proto

T = TypeVar("T")

RECORDS: dict[type, type[Message]] = {
    # a served model (proto/records/model.py)
    model.Preprocessing: pb.Preprocessing,
    model.Parameter: pb.ParameterInfo,
    model.QkvLayout: pb.AttentionModule,
    model.Unplaced: pb.UnplacedParameter,
    model.ModelVersion: pb.ModelVersion,
    model.ModelInfo: pb.ModelInfo,
    model.ClassScore: pb.ClassScore,
    model.Prediction: pb.Prediction,
    model.PredictResult: pb.PredictResponse,
    # training (proto/records/training.py)
    training.GradientSummary: pb.GradientSummary,
    training.QkvGradient: pb.QkvGradient,
    training.HeadScores: pb.HeadScores,
    training.StepResult: pb.TrainStepResponse,
    training.HeadImportanceResult: pb.HeadImportanceResponse,
    training.GradientHistory: pb.GradientHistoryResponse,
    training.EvalResult: pb.EvalStepResponse,
    training.LinearSchedule: pb.LinearSchedule,
    training.OptimizerState: pb.OptimizerState,
    training.CheckpointInfo: pb.CheckpointInfo,
    training.CheckpointList: pb.ListCheckpointsResponse,
    # ExplainGradients (proto/records/explain.py)
    explain.GraphNode: pb.GraphNode,
    explain.QkvPartGradient: pb.QkvPartGradient,
    explain.ParameterGradientPath: pb.ParameterGradientPath,
    explain.Explanation: pb.ExplainGradientsResponse,
    explain.ImageAttribution: pb.ImageAttribution,
    explain.AttributeResult: pb.AttributeResponse,
    # KServe v2 (proto/records/v2.py, proto/open_inference.proto)
    kserve.Duration: v2.StatisticDuration,
    kserve.InferStatistics: v2.InferStatistics,
    kserve.BatchStatistics: v2.InferBatchStatistics,
    kserve.ModelStatistics: v2.ModelStatistics,
    kserve.ModelStatisticsList: v2.ModelStatisticsResponse,
    kserve.ModelIndex: v2.RepositoryIndexResponse.ModelIndex,
    kserve.RepositoryIndex: v2.RepositoryIndexResponse,
}
"""Record class -> its message. Every message field is a field or a property of the record, every record field is
a message field."""

_RECORD_OF = {message.DESCRIPTOR: record for record, message in RECORDS.items()}  # message -> record class

Convert = Callable[[Any], Any]


# ---------------------------------------------------------------- records -> messages

def to_proto(record: Any) -> Message:
    """The message of a record in RECORDS, filled from the record's same-named attributes (None: left unset)."""
    message_type, plan, read = _writer(type(record))
    values = read(record) if len(plan) > 1 else (read(record),)
    return message_type(**{name: convert(value) if convert else value for (name, convert), value in zip(plan, values)
                           if value is not None})


@functools.cache
def _writer(record_type: type) -> tuple[type[Message], list[tuple[str, Convert | None]], Callable[[Any], Any]]:
    """(message type, [(field, converter or None)], a getter of all those attributes at once) for a record type,
    worked out once: a TrainStep answer holds one GradientSummary per parameter."""
    message_type = RECORDS[record_type]
    plan = [(f.name, _writer_of(f)) for f in message_type.DESCRIPTOR.fields]
    return message_type, plan, operator.attrgetter(*(name for name, _ in plan))


def _writer_of(f: FieldDescriptor) -> Convert | None:
    if _is_map(f):
        return dict
    if f.message_type is not None:
        one = tensor_to_proto if f.message_type is pb.Tensor.DESCRIPTOR else to_proto
        return (lambda values: [one(v) for v in values]) if f.is_repeated else one
    if f.is_repeated:
        return list
    if f.enum_type is not None:
        numbers = {name: value.number for name, value in f.enum_type.values_by_name.items()}
        return lambda value: numbers[value] if isinstance(value, str) else value  # str values are enum names
    return None


# ---------------------------------------------------------------- messages -> records

def from_proto(record_type: type[T], message: Message) -> T:
    """Record `record_type` (a key of RECORDS) from its message, field by field; derived fields are not read."""
    plan, read = _reader(record_type)
    values = read(message) if len(plan) > 1 else (read(message),)
    kwargs = {}
    for (name, convert, optional), value in zip(plan, values):
        if optional and not message.HasField(name):
            kwargs[name] = None  # an unset message: no schedule, no logits, an unreported node
        else:
            kwargs[name] = convert(value) if convert else value
    return record_type(**kwargs)


@functools.cache
def _reader(record_type: type) -> tuple[tuple[tuple[str, Convert | None, bool], ...], Callable[[Message], Any]]:
    """Per record field (its name, the converter or None for the value as it is, whether it may be an unset
    message), and one getter of all those message fields at once; worked out once per record type from its type
    hints and the message's descriptor."""
    descriptor = RECORDS[record_type].DESCRIPTOR
    hints = typing.get_type_hints(record_type)
    plan = []
    for f in dataclasses.fields(record_type):
        hint = hints[f.name]
        inner = _without_none(hint)
        plan.append((f.name, _reader_of(inner, descriptor.fields_by_name[f.name]), inner is not hint))
    return tuple(plan), operator.attrgetter(*(name for name, _, _ in plan))


def _reader_of(hint: Any, f: FieldDescriptor) -> Convert | None:
    """One message field's value -> the shape `hint` asks for (None: the value as it is)."""
    if _is_map(f):
        return dict
    if f.is_repeated:
        container = typing.get_origin(hint)  # tuple or list
        element = _element(typing.get_args(hint)[0], f)
        return (lambda values: container(map(element, values))) if element else container
    return _element(hint, f)


def _element(hint: Any, f: FieldDescriptor) -> Convert | None:
    """A scalar as it is (None), a float32 as its short decimal, an enum by name (for a str hint), a Tensor as an
    array, a message as its record."""
    if f.type == FieldDescriptor.TYPE_FLOAT:
        return _float32
    if f.enum_type is not None and hint is str:
        names = {number: value.name for number, value in f.enum_type.values_by_number.items()}
        return lambda value: names.get(value, str(value))
    if f.message_type is None:
        return None
    if f.message_type is pb.Tensor.DESCRIPTOR:
        return tensor_from_proto
    record_type = _RECORD_OF[f.message_type]
    return lambda value: from_proto(record_type, value)


def _float32(value: float) -> float:
    return float(str(np.float32(value)))


def _without_none(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry
