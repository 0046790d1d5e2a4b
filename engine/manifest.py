"""manifest.json: what an export wrote and how to use it, as one typed record.

`model/export.py` builds a `Manifest` and `write`s it; the server, the engines and the Triton
writer `load` it. Nothing else reads or writes the JSON: every field has a name here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from engine.errors import ConfigError
from proto.records.model import Parameter, Preprocessing, QkvLayout, Unplaced

MANIFEST = "manifest.json"
INFERENCE_MODEL = "inference.onnx"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
GRADIENT_MODEL = "gradient_model.onnx"  # the `ort` trainer: loss, logits and every gradient (model/gradgraph.py)
FORWARD_MODEL = "forward_model.onnx"  # its eval-mode forward, parameters as inputs (EvalStep, Publish)
WEIGHTS = "weights.safetensors"  # its starting point: the exported trainable weights
ATTRIBUTION_MODEL = "attribution_model.onnx"  # logits, attention, their gradients (model/attribution.py)
TRAINER_FILES = {  # what each trainer reads, besides the inference model
    "ort": (GRADIENT_MODEL, FORWARD_MODEL, WEIGHTS),
    "ort-training": (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT),
}
ARTIFACT_FILES = (INFERENCE_MODEL, *TRAINER_FILES["ort"], *TRAINER_FILES["ort-training"], ATTRIBUTION_MODEL)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")  # Pillow's resampling filters, by name


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (-1 is the dynamic batch axis) and element type."""
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class LossNode:
    """The training graph's node that computes the loss (it produces the graph's first output)."""
    name: str
    op_type: str
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Attribution:
    """What attribution_model.onnx outputs and how its outputs become maps over the image (written by
    model/attribution.py, read by engine/graph/attribution.py).

    The graph outputs each attention block's probabilities A_l (batch, heads[l], tokens, tokens) and their gradient.
    A map is read at the rows `readout` ([start, end): the class token's row, or the rows mean pooling averages)
    over the patch tokens, which start at `patch_tokens` and run row by row over the `grid` of cells of `patch`
    pixels; input x gradient is summed over the same cells. `reason` says why the attention maps cannot be read
    (a model without attention gets the input gradient only); it is "" when they can.
    """
    blocks: int  # attention blocks the graph outputs A_l and its gradient for, in order; 0: the input gradient only
    heads: tuple[int, ...] = ()  # heads per block
    tokens: int = 0  # tokens per image in every block's attention
    pooling: str = ""  # "cls": the classifier reads one token; "mean": the mean of the readout tokens; "": no maps
    readout: tuple[int, int] = (0, 0)  # the rows a map is read at, [start, end)
    cls_token: int = -1  # the token the classifier reads under "cls" pooling; -1 otherwise
    patch_tokens: int = 0  # index of the first patch token
    extra_tokens: tuple[int, ...] = ()  # the tokens that are no image patch (class, distillation, register tokens)
    grid: tuple[int, int] = (1, 1)  # (rows, columns) of the maps
    patch: tuple[int, int] = (1, 1)  # pixels per grid cell (height, width)
    reason: str = ""  # why rollout and chefer are unavailable ("" when they are)


@dataclass(frozen=True)
class Manifest:
    name: str
    source: dict[str, Any]  # {"preset", "config"} or {"model": "module:Class", "kwargs"}
    input: TensorSpec
    output: TensorSpec
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    parameters: tuple[Parameter, ...]  # model order
    attention: tuple[QkvLayout, ...]  # block order
    inference_fused_attention_blocks: int  # MultiHeadAttention nodes in inference.onnx (engine/graph/fusion.py)
    loss: LossNode  # the node of the training artifacts' graph that computes the loss (trainer ort-training)
    opset: int
    optimizer: dict[str, Any]  # {"name": "adamw" | "sgd", hyperparameters...}
    versions: dict[str, str]  # package versions the export ran with
    files: dict[str, str]  # artifact file -> sha256
    unplaced: tuple[Unplaced, ...] = ()  # parameters left in block -1, sub-layer "other", with the reason
    frozen_batchnorm: tuple[str, ...] = ()  # BatchNorm modules trained on their frozen running statistics
    gradient_loss: LossNode | None = None  # the node of gradient_model.onnx that computes the loss (trainer ort)
    attribution: Attribution | None = None  # attribution_model.onnx's layout (None: an export before it existed)
    export_check: dict[str, Any] = field(default_factory=dict)  # model/verify.py's report
    export_seconds: float = 0.0
    folder: Path = field(default=Path("."), compare=False)  # where it was loaded from; not written

    # -- reading and writing ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        del raw["folder"]
        return raw

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, folder: Path, files: tuple[str, ...] = ARTIFACT_FILES) -> "Manifest":
        """Read `folder`/manifest.json, every field checked for presence and type, and the artifacts in `files` (all
        of them by default; an inference-only replica needs only inference.onnx) against their sha256.
        ConfigError (one line naming the field or file) on any problem."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{path} not found: run `make export` (or python -m model.export) first")
        try:
            manifest = _SCHEMA.validate_json(path.read_bytes(), strict=True)
        except ValidationError as e:
            raise ConfigError(f"{path}: {_first_problem(e)}") from None
        except OSError as e:
            raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
        manifest = dataclasses.replace(manifest, folder=folder)
        manifest.verify_files(files)
        return manifest

    def verify_files(self, files: tuple[str, ...] = ARTIFACT_FILES) -> None:
        """Every artifact in `files` is listed, exists and has the sha256 the export recorded."""
        for name in files:
            path = self.folder / name
            if name not in self.files:
                raise ConfigError(f"{self.folder / MANIFEST}: field files.{name} is missing: re-run the export")
            if not path.is_file():
                raise ConfigError(f"artifact {path} is missing: re-run the export")
            if sha256(path) != self.files[name]:
                raise ConfigError(f"artifact {path} does not match the sha256 in {MANIFEST}: re-run the export")

    # -- derived ----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(-1, C, H, W): -1 is the dynamic batch axis."""
        return self.input.shape

    @property
    def output_name(self) -> str:
        return self.output.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def trainable(self) -> list[str]:
        return [p.name for p in self.parameters if p.trainable]

    @property
    def qkv(self) -> tuple[QkvLayout, ...]:
        return self.attention


_SCHEMA = TypeAdapter(Manifest)  # pydantic checks every field of the JSON against the dataclasses above


def _first_problem(error: ValidationError) -> str:
    """The first validation problem as `field a.b.0: message` (and how many more there are)."""
    problems = error.errors(include_url=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "(the document)"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    if first["type"] == "missing":
        return f"field {where} is missing{more}"
    if first["type"] == "json_invalid":
        return f"not valid JSON: {first['msg']}{more}"
    return f"field {where}: {first['msg']}{more}"
