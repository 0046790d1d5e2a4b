"""A served model's records: GetModelInfo's answer and its parts (also the manifest's), versions, Predict's answer."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from proto.records import Record, jsonable


@dataclass(frozen=True)
class Preprocessing(Record):
    """How an encoded image becomes model input: resize (and crop) to height x width, then (pixel / 255 - mean) / std.

    resize_shorter 0 resizes straight to height x width; N > 0 resizes so the shorter side is N (keeping the aspect
    ratio), then cuts the centre height x width out (the checkpoint's own recipe: timm's crop_pct, Hugging Face's
    shortest_edge + crop_size). interpolation is the resampling filter, by Pillow's name ("" from an older server
    reads as bilinear)."""
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_shorter: int = 0  # 0: resize to height x width; N > 0: shorter side to N, then a centre crop
    interpolation: str = "bilinear"  # one of proto.images.INTERPOLATIONS

    def __post_init__(self):
        if not self.interpolation:
            object.__setattr__(self, "interpolation", "bilinear")


@dataclass(frozen=True)
class Parameter(Record):
    """One parameter of the exported model and where it sits (placed once, at export; proto: ParameterInfo)."""
    name: str  # as in the PyTorch state_dict
    shape: tuple[int, ...]
    trainable: bool
    block: int = -1  # transformer block index, -1 outside the blocks
    sublayer: str = "other"  # attention.qkv, attention.out, attention.norm, feedforward, ..., embedding, head


@dataclass(frozen=True)
class QkvLayout(Record):
    """How one attention module makes q, k and v, from which parameters, with how many heads (proto: AttentionModule).

    Fused (one weight named three times): its rows are (3, heads, dim_head), q first, then k, then v,
    and so are its bias's. Separate: three weights (and biases) whose rows are (heads, dim_head).
    """
    name: str  # fused: the projection's weight; separate: the attention module
    block: int
    heads: int
    dim_head: int
    weights: tuple[str, ...] = ()  # q, k and v weight parameters; () means (name, name, name)
    biases: tuple[str, ...] = ()  # q, k and v bias parameters; () when the projections have none
    module: str = ""  # the attention module's path in the model
    DERIVED = ("fused",)

    def __post_init__(self):
        if not self.weights:
            object.__setattr__(self, "weights", (self.name,) * 3)
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "biases", tuple(self.biases))

    @property
    def fused(self) -> bool:
        return len(set(self.weights)) == 1

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head


@dataclass(frozen=True)
class Unplaced(Record):
    """A parameter the export could not place in a block and sub-layer, and why (proto: UnplacedParameter)."""
    name: str
    reason: str


@dataclass(frozen=True)
class ModelVersion(Record):
    """One inference model version: 0 is the exported model, each Publish adds one."""
    version: int
    step: int
    created_unix: float


@dataclass(frozen=True)
class ModelInfo(Record):
    """GetModelInfo's answer: the served model, how to feed it, its training state and the server's settings."""
    name: str
    config_json: str  # the export's source: preset and config, or module:Class and kwargs (`config`: as a dict)
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str  # a DataType name
    preprocessing: Preprocessing
    class_names: list[str]
    parameters: list[Parameter]
    execution_providers: list[str]
    device: str
    opset: int
    optimizer: str
    step: int
    learning_rate: float
    max_batch_size: int
    export_versions: dict[str, str]
    loss_node: str
    loss_op_type: str
    model_version: int = 0
    versions: list[ModelVersion] = field(default_factory=list)
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 0.0
    publish_every_steps: int = 0
    attention: list[QkvLayout] = field(default_factory=list)
    unplaced: list[Unplaced] = field(default_factory=list)
    role: str = "all"  # all | train | predict
    trainer: str = ""  # "ort" or "ort-training"; "" on an inference-only replica
    onnxruntime_version: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json) if self.config_json else {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict, the export's config as an object (`config`), not as its text."""
        return {("config" if k == "config_json" else k): (self.config if k == "config_json" else v)
                for k, v in super().as_dict().items()}


@dataclass(frozen=True)
class ClassScore(Record):
    """One class with its softmax probability; unpacks and indexes as the tuple (index, label, probability)."""
    index: int
    label: str
    probability: float

    def __iter__(self) -> Iterator[Any]:
        return iter((self.index, self.label, self.probability))

    def __getitem__(self, i: int) -> Any:
        return (self.index, self.label, self.probability)[i]


@dataclass(frozen=True)
class Prediction(Record):
    """The top-k classes of one image, best first; iterates, indexes and counts as those ClassScores."""
    top: list[ClassScore]

    def __iter__(self) -> Iterator[ClassScore]:
        return iter(self.top)

    def __len__(self) -> int:
        return len(self.top)

    def __getitem__(self, i: int) -> ClassScore:
        return self.top[i]


@dataclass(frozen=True)
class PredictResult(Record):
    """Predict's answer: per image its top-k classes, the logits when asked for, and the model version that answered."""
    predictions: list[Prediction]
    logits: np.ndarray | None = None  # (batch, classes) float32
    model_version: int = 0

    @classmethod
    def of(cls, indices: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...],
           logits: np.ndarray | None, model_version: int) -> PredictResult:
        """From (batch, k) class indices and their probabilities, best first."""
        return cls([Prediction([ClassScore(int(i), class_names[i], float(p)) for i, p in zip(row, probs)])
                    for row, probs in zip(indices.tolist(), probabilities.tolist())], logits, model_version)

    def as_dict(self) -> dict[str, Any]:
        """Per image a list of [index, label, probability] lists, the logits as nested lists, the model version."""
        return {"predictions": [[list(score) for score in p] for p in self.predictions],
                "logits": jsonable(self.logits), "model_version": self.model_version}
