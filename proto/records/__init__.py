"""The wire records: each vitserve.v1 (and KServe v2) answer and its parts, defined once as a frozen dataclass.

The engine and the server build these records, proto/convert.py turns them into their messages and back, and the
client hands the same classes to its users. Fields are named after the message's fields; a message field that is
a property here (QkvLayout.fused, EvalResult.accuracy, CheckpointList.latest, ...) is derived from the other
fields on both sides. The records are grouped by what they describe:

    model.py     a served model: ModelInfo and its parts, model versions, Predict's answer
    training.py  train steps, gradients, head importance, evaluation, the optimizer, checkpoints
    explain.py   where each gradient is computed (ExplainGradients)
    v2.py        KServe v2: statistics and the repository index
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """Recursively turn records, numpy arrays/scalars and tuples into JSON-friendly values."""
    if isinstance(value, Record):
        return value.as_dict()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class Record:
    """What every wire record can do besides holding its fields."""

    DERIVED: tuple[str, ...] = ()  # properties that are part of the record's document (and of its message)

    def as_dict(self) -> dict[str, Any]:
        """The fields, then the DERIVED properties, as a JSON-serializable dict (nested records become dicts, arrays
        nested lists)."""
        names = [f.name for f in dataclasses.fields(self)] + list(self.DERIVED)  # type: ignore[arg-type]
        return {name: jsonable(getattr(self, name)) for name in names}
