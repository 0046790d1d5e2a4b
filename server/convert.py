"""Records <-> messages: the one place where the server's records meet the wire schema.

Each record (a frozen dataclass in engine/, server/dataplane.py, server/registry.py, server/trainer.py or server/statistics.py) is defined
once and maps to one proto message, field by field and by name (RECORDS): vitserve.v1's, and the
KServe v2 messages built from records (statistics, repository index). Conversion is generic: nested records become
nested messages, sequences repeated fields, str values of enum fields their numbers. A test checks
every pair both ways, so a proto field without a counterpart fails the suite.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

from google.protobuf.message import Message

from engine.graph.explain import Explanation, GraphNode, ParameterGradientPath, QkvPartGradient
from engine.train.gradients import GradientSummary, QkvGradient
from engine.graph.heads import HeadScores
from engine.manifest import Parameter, Preprocessing, QkvLayout, Unplaced
from engine.train.schedule import LinearSchedule
from engine.store.files import CheckpointInfo, CheckpointList, ModelVersion
from engine.train.step import EvalResult, HeadImportanceResult, OptimizerState, StepResult
from proto import open_inference_pb2 as v2
from proto import vitserve_pb2 as pb
from server.dataplane import ModelInfo
from server.decode import encode_tensor
from server.models import Prediction
from server.registry import ModelIndex, RepositoryIndex
from server.statistics import BatchStatistics, Duration, InferStatistics, ModelStatistics, ModelStatisticsList
from server.trainer import GradientHistory

RECORDS: dict[type, type[Message]] = {
    GradientSummary: pb.GradientSummary,
    QkvGradient: pb.QkvGradient,
    StepResult: pb.TrainStepResponse,
    EvalResult: pb.EvalStepResponse,
    LinearSchedule: pb.LinearSchedule,
    OptimizerState: pb.OptimizerState,
    CheckpointInfo: pb.CheckpointInfo,
    CheckpointList: pb.ListCheckpointsResponse,
    ModelVersion: pb.ModelVersion,
    Preprocessing: pb.Preprocessing,
    Parameter: pb.ParameterInfo,
    QkvLayout: pb.AttentionModule,
    Unplaced: pb.UnplacedParameter,
    GraphNode: pb.GraphNode,
    QkvPartGradient: pb.QkvPartGradient,
    ParameterGradientPath: pb.ParameterGradientPath,
    Explanation: pb.ExplainGradientsResponse,
    ModelInfo: pb.ModelInfo,
    HeadScores: pb.HeadScores,
    HeadImportanceResult: pb.HeadImportanceResponse,
    GradientHistory: pb.GradientHistoryResponse,
    # KServe v2 (proto/open_inference.proto)
    Duration: v2.StatisticDuration,
    InferStatistics: v2.InferStatistics,
    BatchStatistics: v2.InferBatchStatistics,
    ModelStatistics: v2.ModelStatistics,
    ModelStatisticsList: v2.ModelStatisticsResponse,
    ModelIndex: v2.RepositoryIndexResponse.ModelIndex,
    RepositoryIndex: v2.RepositoryIndexResponse,
}
"""Record type -> its message. Every field of the message is an attribute of the record (a field or a property)."""


def to_proto(record: Any) -> Message:
    """The message of a record in RECORDS, filled from the record's same-named attributes."""
    message_type, plan, read = _plan(type(record))
    values = read(record) if len(plan) > 1 else (read(record),)
    return message_type(**{name: convert(value) if convert else value for (name, convert), value in zip(plan, values)
                           if value is not None})  # None: an unset optional message (e.g. no schedule)


@functools.cache
def _plan(record_type: type) -> tuple[type[Message], list[tuple[str, Any]], Any]:
    """(message type, [(field, converter or None)], a getter of all those attributes at once) for a record
    type, worked out once from the descriptor.

    Filling a message through its constructor, with the per-field decisions made ahead, costs a fraction of
    walking the descriptor for every record (a TrainStep answer holds one GradientSummary per parameter)."""
    message_type = RECORDS[record_type]
    fields = []
    for f in message_type.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            convert = dict
        elif f.message_type is not None and f.is_repeated:
            convert = _each_to_proto
        elif f.message_type is not None:
            convert = to_proto
        elif f.is_repeated:
            convert = list
        elif f.enum_type is not None:
            convert = _enum_number(f.enum_type)
        else:
            convert = None
        fields.append((f.name, convert))
    return message_type, fields, operator.attrgetter(*(name for name, _ in fields))


def _each_to_proto(values) -> list[Message]:
    return [to_proto(v) for v in values]


def _enum_number(enum_type):
    def number(value):  # str values of enum fields are their names
        return enum_type.values_by_name[value].number if isinstance(value, str) else value
    return number


def from_proto(message: Message, record_type: type) -> Any:
    """A record from its message (the inverse of to_proto for records whose fields are all on the wire)."""
    values = {}
    for f in dataclasses.fields(record_type):
        value = getattr(message, f.name)
        nested = next((r for r, m in RECORDS.items() if m.DESCRIPTOR is getattr(value, "DESCRIPTOR", None)), None)
        values[f.name] = from_proto(value, nested) if nested else value
    return record_type(**values)


def prediction_proto(result: Prediction) -> pb.PredictResponse:
    """Predict's answer: top-k (index, label, probability) per image, the logits when asked for."""
    response = pb.PredictResponse(model_version=result.model_version, predictions=[
        pb.Prediction(top=[pb.ClassScore(index=int(i), label=name, probability=float(p))
                           for i, name, p in zip(idx, names, probs)])
        for idx, names, probs in zip(result.indices, result.labels, result.probabilities)
    ])
    if result.logits is not None:
        response.logits.CopyFrom(encode_tensor(result.logits))
    return response
