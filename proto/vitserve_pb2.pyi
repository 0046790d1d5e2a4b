from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT64: DataType
FLOAT16: DataType
INT64: DataType
INT32: DataType
UINT8: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Images(_message.Message):
    __slots__ = ("tensor", "encoded")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    encoded: EncodedImages
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "top_k", "return_logits", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: Images
    top_k: int
    return_logits: bool
    model: str
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., top_k: _Optional[int] = ..., return_logits: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "logits", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    logits: Tensor
    model_version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("images", "labels", "omit_gradient_summaries", "accumulate_only", "head_importance")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OMIT_GRADIENT_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    HEAD_IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    images: Images
    labels: Tensor
    omit_gradient_summaries: bool
    accumulate_only: bool
    head_importance: bool
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., omit_gradient_summaries: _Optional[bool] = ..., accumulate_only: _Optional[bool] = ..., head_importance: _Optional[bool] = ...) -> None: ...

class GradientSummary(_message.Message):
    __slots__ = ("name", "shape", "l2_norm", "mean", "std", "min", "max", "max_abs", "zero_fraction", "nonfinite_count", "param_norm", "update_ratio", "block", "sublayer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARAM_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SUBLAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    l2_norm: float
    mean: float
    std: float
    min: float
    max: float
    max_abs: float
    zero_fraction: float
    nonfinite_count: int
    param_norm: float
    update_ratio: float
    block: int
    sublayer: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., l2_norm: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., max_abs: _Optional[float] = ..., zero_fraction: _Optional[float] = ..., nonfinite_count: _Optional[int] = ..., param_norm: _Optional[float] = ..., update_ratio: _Optional[float] = ..., block: _Optional[int] = ..., sublayer: _Optional[str] = ...) -> None: ...

class QkvGradient(_message.Message):
    __slots__ = ("name", "block", "heads", "dim_head", "q_norm", "k_norm", "v_norm", "q_head_norms", "k_head_norms", "v_head_norms", "module", "weights", "biases", "q_bias_norm", "k_bias_norm", "v_bias_norm", "q_bias_head_norms", "k_bias_head_norms", "v_bias_head_norms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    DIM_HEAD_FIELD_NUMBER: _ClassVar[int]
    Q_NORM_FIELD_NUMBER: _ClassVar[int]
    K_NORM_FIELD_NUMBER: _ClassVar[int]
    V_NORM_FIELD_NUMBER: _ClassVar[int]
    Q_HEAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    K_HEAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    V_HEAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BIASES_FIELD_NUMBER: _ClassVar[int]
    Q_BIAS_NORM_FIELD_NUMBER: _ClassVar[int]
    K_BIAS_NORM_FIELD_NUMBER: _ClassVar[int]
    V_BIAS_NORM_FIELD_NUMBER: _ClassVar[int]
    Q_BIAS_HEAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    K_BIAS_HEAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    V_BIAS_HEAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    block: int
    heads: int
    dim_head: int
    q_norm: float
    k_norm: float
    v_norm: float
    q_head_norms: _containers.RepeatedScalarFieldContainer[float]
    k_head_norms: _containers.RepeatedScalarFieldContainer[float]
    v_head_norms: _containers.RepeatedScalarFieldContainer[float]
    module: str
    weights: _containers.RepeatedScalarFieldContainer[str]
    biases: _containers.RepeatedScalarFieldContainer[str]
    q_bias_norm: float
    k_bias_norm: float
    v_bias_norm: float
    q_bias_head_norms: _containers.RepeatedScalarFieldContainer[float]
    k_bias_head_norms: _containers.RepeatedScalarFieldContainer[float]
    v_bias_head_norms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., block: _Optional[int] = ..., heads: _Optional[int] = ..., dim_head: _Optional[int] = ..., q_norm: _Optional[float] = ..., k_norm: _Optional[float] = ..., v_norm: _Optional[float] = ..., q_head_norms: _Optional[_Iterable[float]] = ..., k_head_norms: _Optional[_Iterable[float]] = ..., v_head_norms: _Optional[_Iterable[float]] = ..., module: _Optional[str] = ..., weights: _Optional[_Iterable[str]] = ..., biases: _Optional[_Iterable[str]] = ..., q_bias_norm: _Optional[float] = ..., k_bias_norm: _Optional[float] = ..., v_bias_norm: _Optional[float] = ..., q_bias_head_norms: _Optional[_Iterable[float]] = ..., k_bias_head_norms: _Optional[_Iterable[float]] = ..., v_bias_head_norms: _Optional[_Iterable[float]] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("loss", "step", "learning_rate", "grad_norm", "gradients", "attention", "step_seconds", "applied", "skipped_reason", "accumulated_batches", "clip_coefficient", "head_importance")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    HEAD_IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    loss: float
    step: int
    learning_rate: float
    grad_norm: float
    gradients: _containers.RepeatedCompositeFieldContainer[GradientSummary]
    attention: _containers.RepeatedCompositeFieldContainer[QkvGradient]
    step_seconds: float
    applied: bool
    skipped_reason: str
    accumulated_batches: int
    clip_coefficient: float
    head_importance: _containers.RepeatedCompositeFieldContainer[HeadScores]
    def __init__(self, loss: _Optional[float] = ..., step: _Optional[int] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., gradients: _Optional[_Iterable[_Union[GradientSummary, _Mapping]]] = ..., attention: _Optional[_Iterable[_Union[QkvGradient, _Mapping]]] = ..., step_seconds: _Optional[float] = ..., applied: _Optional[bool] = ..., skipped_reason: _Optional[str] = ..., accumulated_batches: _Optional[int] = ..., clip_coefficient: _Optional[float] = ..., head_importance: _Optional[_Iterable[_Union[HeadScores, _Mapping]]] = ...) -> None: ...

class HeadScores(_message.Message):
    __slots__ = ("block", "module", "importance")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    block: int
    module: str
    importance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, block: _Optional[int] = ..., module: _Optional[str] = ..., importance: _Optional[_Iterable[float]] = ...) -> None: ...

class HeadImportanceRequest(_message.Message):
    __slots__ = ("images", "labels")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    images: Images
    labels: Tensor
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class HeadImportanceResponse(_message.Message):
    __slots__ = ("loss", "step", "heads")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    step: int
    heads: _containers.RepeatedCompositeFieldContainer[HeadScores]
    def __init__(self, loss: _Optional[float] = ..., step: _Optional[int] = ..., heads: _Optional[_Iterable[_Union[HeadScores, _Mapping]]] = ...) -> None: ...

class GradientHistoryRequest(_message.Message):
    __slots__ = ("first_step", "last_step", "parameter")
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    first_step: int
    last_step: int
    parameter: str
    def __init__(self, first_step: _Optional[int] = ..., last_step: _Optional[int] = ..., parameter: _Optional[str] = ...) -> None: ...

class GradientHistoryResponse(_message.Message):
    __slots__ = ("steps", "capacity")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[TrainStepResponse]
    capacity: int
    def __init__(self, steps: _Optional[_Iterable[_Union[TrainStepResponse, _Mapping]]] = ..., capacity: _Optional[int] = ...) -> None: ...

class EvalStepRequest(_message.Message):
    __slots__ = ("images", "labels")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    images: Images
    labels: Tensor
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EvalStepResponse(_message.Message):
    __slots__ = ("loss", "accuracy", "correct", "count", "step")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    correct: int
    count: int
    step: int
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., correct: _Optional[int] = ..., count: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class LinearSchedule(_message.Message):
    __slots__ = ("peak_lr", "warmup_steps", "decay_steps", "end_lr")
    PEAK_LR_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECAY_STEPS_FIELD_NUMBER: _ClassVar[int]
    END_LR_FIELD_NUMBER: _ClassVar[int]
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    end_lr: float
    def __init__(self, peak_lr: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., decay_steps: _Optional[int] = ..., end_lr: _Optional[float] = ...) -> None: ...

class GetOptimizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetOptimizerRequest(_message.Message):
    __slots__ = ("learning_rate", "schedule", "clip_grad_norm")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    schedule: LinearSchedule
    clip_grad_norm: float
    def __init__(self, learning_rate: _Optional[float] = ..., schedule: _Optional[_Union[LinearSchedule, _Mapping]] = ..., clip_grad_norm: _Optional[float] = ...) -> None: ...

class OptimizerState(_message.Message):
    __slots__ = ("optimizer", "learning_rate", "schedule", "schedule_position", "clip_grad_norm", "step", "accumulated_batches")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_POSITION_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    learning_rate: float
    schedule: LinearSchedule
    schedule_position: int
    clip_grad_norm: float
    step: int
    accumulated_batches: int
    def __init__(self, optimizer: _Optional[str] = ..., learning_rate: _Optional[float] = ..., schedule: _Optional[_Union[LinearSchedule, _Mapping]] = ..., schedule_position: _Optional[int] = ..., clip_grad_norm: _Optional[float] = ..., step: _Optional[int] = ..., accumulated_batches: _Optional[int] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("name", "step", "created_unix", "size_bytes", "reason", "problem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    created_unix: float
    size_bytes: int
    reason: str
    problem: str
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., created_unix: _Optional[float] = ..., size_bytes: _Optional[int] = ..., reason: _Optional[str] = ..., problem: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "latest")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    latest: str
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ..., latest: _Optional[str] = ...) -> None: ...

class RestoreCheckpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "step", "created_unix")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    created_unix: float
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., created_unix: _Optional[float] = ...) -> None: ...

class ExplainGradientsRequest(_message.Message):
    __slots__ = ("parameter",)
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    parameter: str
    def __init__(self, parameter: _Optional[str] = ...) -> None: ...

class GraphNode(_message.Message):
    __slots__ = ("name", "op_type", "inputs", "outputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    op_type: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., op_type: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class QkvPartGradient(_message.Message):
    __slots__ = ("part", "tensor", "gradient_tensor", "gradient_node")
    PART_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_TENSOR_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_NODE_FIELD_NUMBER: _ClassVar[int]
    part: str
    tensor: str
    gradient_tensor: str
    gradient_node: GraphNode
    def __init__(self, part: _Optional[str] = ..., tensor: _Optional[str] = ..., gradient_tensor: _Optional[str] = ..., gradient_node: _Optional[_Union[GraphNode, _Mapping]] = ...) -> None: ...

class ParameterGradientPath(_message.Message):
    __slots__ = ("name", "shape", "block", "sublayer", "gradient_tensor", "gradient_node", "ops_from_loss", "path", "qkv_parts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SUBLAYER_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_TENSOR_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_NODE_FIELD_NUMBER: _ClassVar[int]
    OPS_FROM_LOSS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QKV_PARTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    block: int
    sublayer: str
    gradient_tensor: str
    gradient_node: GraphNode
    ops_from_loss: int
    path: _containers.RepeatedCompositeFieldContainer[GraphNode]
    qkv_parts: _containers.RepeatedCompositeFieldContainer[QkvPartGradient]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., block: _Optional[int] = ..., sublayer: _Optional[str] = ..., gradient_tensor: _Optional[str] = ..., gradient_node: _Optional[_Union[GraphNode, _Mapping]] = ..., ops_from_loss: _Optional[int] = ..., path: _Optional[_Iterable[_Union[GraphNode, _Mapping]]] = ..., qkv_parts: _Optional[_Iterable[_Union[QkvPartGradient, _Mapping]]] = ...) -> None: ...

class ExplainGradientsResponse(_message.Message):
    __slots__ = ("loss", "loss_gradient", "parameters", "forward_nodes", "backward_nodes")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NODES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_NODES_FIELD_NUMBER: _ClassVar[int]
    loss: GraphNode
    loss_gradient: GraphNode
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterGradientPath]
    forward_nodes: int
    backward_nodes: int
    def __init__(self, loss: _Optional[_Union[GraphNode, _Mapping]] = ..., loss_gradient: _Optional[_Union[GraphNode, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[ParameterGradientPath, _Mapping]]] = ..., forward_nodes: _Optional[int] = ..., backward_nodes: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("height", "width", "channels", "mean", "std", "resize_shorter", "interpolation")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SHORTER_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize_shorter: int
    interpolation: str
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize_shorter: _Optional[int] = ..., interpolation: _Optional[str] = ...) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape", "trainable", "block", "sublayer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SUBLAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    trainable: bool
    block: int
    sublayer: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., trainable: _Optional[bool] = ..., block: _Optional[int] = ..., sublayer: _Optional[str] = ...) -> None: ...

class AttentionModule(_message.Message):
    __slots__ = ("name", "block", "heads", "dim_head", "weights", "biases", "module", "fused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    DIM_HEAD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BIASES_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    block: int
    heads: int
    dim_head: int
    weights: _containers.RepeatedScalarFieldContainer[str]
    biases: _containers.RepeatedScalarFieldContainer[str]
    module: str
    fused: bool
    def __init__(self, name: _Optional[str] = ..., block: _Optional[int] = ..., heads: _Optional[int] = ..., dim_head: _Optional[int] = ..., weights: _Optional[_Iterable[str]] = ..., biases: _Optional[_Iterable[str]] = ..., module: _Optional[str] = ..., fused: _Optional[bool] = ...) -> None: ...

class UnplacedParameter(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "config_json", "input_name", "input_shape", "input_dtype", "preprocessing", "class_names", "parameters", "execution_providers", "device", "opset", "optimizer", "step", "learning_rate", "max_batch_size", "export_versions", "loss_node", "loss_op_type", "model_version", "versions", "checkpoint_every_steps", "checkpoint_every_seconds", "publish_every_steps", "attention", "unplaced", "role", "trainer", "onnxruntime_version")
    class ExportVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOSS_NODE_FIELD_NUMBER: _ClassVar[int]
    LOSS_OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    UNPLACED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    input_name: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: DataType
    preprocessing: Preprocessing
    class_names: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    device: str
    opset: int
    optimizer: str
    step: int
    learning_rate: float
    max_batch_size: int
    export_versions: _containers.ScalarMap[str, str]
    loss_node: str
    loss_op_type: str
    model_version: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    checkpoint_every_steps: int
    checkpoint_every_seconds: float
    publish_every_steps: int
    attention: _containers.RepeatedCompositeFieldContainer[AttentionModule]
    unplaced: _containers.RepeatedCompositeFieldContainer[UnplacedParameter]
    role: str
    trainer: str
    onnxruntime_version: str
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., input_name: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[DataType, str]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., execution_providers: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., opset: _Optional[int] = ..., optimizer: _Optional[str] = ..., step: _Optional[int] = ..., learning_rate: _Optional[float] = ..., max_batch_size: _Optional[int] = ..., export_versions: _Optional[_Mapping[str, str]] = ..., loss_node: _Optional[str] = ..., loss_op_type: _Optional[str] = ..., model_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., checkpoint_every_steps: _Optional[int] = ..., checkpoint_every_seconds: _Optional[float] = ..., publish_every_steps: _Optional[int] = ..., attention: _Optional[_Iterable[_Union[AttentionModule, _Mapping]]] = ..., unplaced: _Optional[_Iterable[_Union[UnplacedParameter, _Mapping]]] = ..., role: _Optional[str] = ..., trainer: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("images", "targets", "method", "heads", "training_weights", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: Images
    targets: _containers.RepeatedScalarFieldContainer[int]
    method: str
    heads: bool
    training_weights: bool
    model: str
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., targets: _Optional[_Iterable[int]] = ..., method: _Optional[str] = ..., heads: _Optional[bool] = ..., training_weights: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class ImageAttribution(_message.Message):
    __slots__ = ("map", "target", "label", "heads")
    MAP_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    map: Tensor
    target: int
    label: str
    heads: Tensor
    def __init__(self, map: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[int] = ..., label: _Optional[str] = ..., heads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AttributeResponse(_message.Message):
    __slots__ = ("attributions", "method", "model_version", "step", "grid", "patch")
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    attributions: _containers.RepeatedCompositeFieldContainer[ImageAttribution]
    method: str
    model_version: int
    step: int
    grid: _containers.RepeatedScalarFieldContainer[int]
    patch: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, attributions: _Optional[_Iterable[_Union[ImageAttribution, _Mapping]]] = ..., method: _Optional[str] = ..., model_version: _Optional[int] = ..., step: _Optional[int] = ..., grid: _Optional[_Iterable[int]] = ..., patch: _Optional[_Iterable[int]] = ...) -> None: ...
