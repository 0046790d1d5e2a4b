"""Which patches a prediction comes from: attention rollout, Chefer et al.'s relevance and input x gradient.

attribution_model.onnx (model/attribution.py) gives, for images and a target class per image, the logits, every
attention block's probabilities A_l (batch, heads, tokens, tokens), the gradient of the target logit with respect
to each A_l and with respect to the images. The maps are numpy over those outputs, read as the manifest's
`Attribution` record says: at the readout rows (the class token's row, or the mean of the rows mean pooling
averages), over the patch tokens, on the patch grid.

- rollout (Abnar & Zuidema 2020): R = Ā_L ... Ā_1 with Ā_l = 0.5 mean_h(A_l) + 0.5 I, rows renormalised.
- chefer (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability"): R_0 = I and, block by block,
  R_l = R_{l-1} + mean_h(ReLU(dA_l * A_l)) @ R_{l-1}; the map is R_L read as above.
- gradxinput: |x * dy_c/dx| summed over the channels and over the pixels of each grid cell.

Per-head maps (heads=True), (blocks, heads, rows, columns) per image:
- chefer: head h of block l's term, ReLU(dA_l,h * A_l,h) @ R_{l-1}, read as above; the map is the identity's
  row plus the sum over blocks of these terms' mean over heads.
- rollout: the rollout with block l's mean over heads replaced by head h alone (0.5 A_l,h + 0.5 I, renormalised).

Weights: the graph takes the trainable parameters as inputs, like gradient_model.onnx, so one file serves every
version. `export_weights` reads the export's (weights.safetensors: version 0), `published_weights` a published
version's inference model (its initializers, by name), and a trainer's current weights are passed as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import load_file

from engine.errors import ConfigError, FailedPrecondition, InvalidArgument
from engine.manifest import ATTRIBUTION_MODEL, WEIGHTS, Attribution, Manifest
from engine.runtime import open_session, session_options
from proto.records.explain import ImageAttribution

TARGET, LOGITS, INPUT_GRAD = "target", "logits", "images_grad"  # the graph's input after the images, its outputs
METHODS = ("rollout", "chefer", "gradxinput")
ATTENTION_METHODS = ("rollout", "chefer")


def attention_name(block: int) -> str:
    return f"attention_{block}"


def attention_grad_name(block: int) -> str:
    return f"attention_{block}_grad"


@dataclass(frozen=True)
class Outputs:
    """One run of the attribution graph."""
    logits: np.ndarray  # (batch, classes)
    attentions: list[np.ndarray]  # per block (batch, heads, tokens, tokens)
    attention_grads: list[np.ndarray]  # the same shapes: d(target logit)/dA_l
    input_grad: np.ndarray  # (batch, c, h, w): d(target logit)/d(images)




# --------------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------------

def _readout_row(record: Attribution) -> np.ndarray:
    """The row vector u (tokens,) a map is read with: u @ R, the class token's row or the mean of the pooled rows."""
    start, end = record.readout
    u = np.zeros(record.tokens)
    u[start:end] = 1.0 / (end - start)
    return u


def _on_grid(rows: np.ndarray, record: Attribution) -> np.ndarray:
    """(..., tokens) -> (..., grid rows, grid columns): the patch tokens' entries."""
    gh, gw = record.grid
    start = record.patch_tokens
    return rows[..., start:start + gh * gw].reshape(*rows.shape[:-1], gh, gw)


def _renormalised(a: np.ndarray) -> np.ndarray:
    return a / a.sum(axis=-1, keepdims=True)


def require_maps(record: Attribution, method: str = "rollout and chefer") -> None:
    """FailedPrecondition unless the model's attention maps can be read (rollout, chefer)."""
    if record.reason or not record.blocks:
        raise FailedPrecondition(f"{method} reads attention maps, which this model does not give: "
                                 f"{record.reason or 'it has no attention'}; only gradxinput works")


def _check_blocks(record: Attribution, *per_block: list[np.ndarray]) -> None:
    require_maps(record)
    if any(len(values) != record.blocks for values in per_block):
        raise ValueError(f"{[len(v) for v in per_block]} blocks given, the record says {record.blocks}")


def rollout(attentions: list[np.ndarray], record: Attribution, heads: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Attention rollout: (maps (batch, rows, columns), per-head maps (batch, blocks, heads, rows, columns) or None)."""
    _check_blocks(record, attentions)
    eye = np.eye(record.tokens)
    blocks = [_renormalised(0.5 * a.astype(np.float64).mean(axis=1) + 0.5 * eye) for a in attentions]  # (b, n, n)
    u = _readout_row(record)
    # prefix[l] = Ā_l ... Ā_1 (prefix[0] = I), suffix[l] = u Ā_L ... Ā_{l+1} (a row per image)
    prefix = [np.broadcast_to(eye, blocks[0].shape)]
    for a in blocks:
        prefix.append(a @ prefix[-1])
    maps = _on_grid(np.einsum("n,bnm->bm", u, prefix[-1]), record)
    if not heads:
        return maps, None
    suffix = [None] * len(blocks)
    row = np.broadcast_to(u, (blocks[0].shape[0], record.tokens))
    for layer in reversed(range(len(blocks))):
        suffix[layer] = row
        row = np.einsum("bn,bnm->bm", row, blocks[layer])
    per_head = []
    for layer, a in enumerate(attentions):
        only = _renormalised(0.5 * a.astype(np.float64) + 0.5 * eye)  # (b, h, n, n)
        through = np.einsum("bn,bhnm->bhm", suffix[layer], only)
        per_head.append(np.einsum("bhn,bnm->bhm", through, prefix[layer]))
    return maps, _on_grid(np.stack(per_head, axis=1), record)


def chefer(attentions: list[np.ndarray], gradients: list[np.ndarray], record: Attribution, heads: bool = False
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Chefer et al.'s relevance: (maps (batch, rows, columns), per-head maps (batch, blocks, heads, rows, columns)
    or None)."""
    _check_blocks(record, attentions, gradients)
    u = _readout_row(record)
    relevance = np.broadcast_to(np.eye(record.tokens), (attentions[0].shape[0], record.tokens, record.tokens))
    per_head = []
    for a, g in zip(attentions, gradients):
        cam = np.maximum(g.astype(np.float64) * a.astype(np.float64), 0.0)  # (b, h, n, n)
        if heads:
            per_head.append(np.einsum("n,bhnk,bkm->bhm", u, cam, relevance))
        relevance = relevance + cam.mean(axis=1) @ relevance
    maps = _on_grid(np.einsum("n,bnm->bm", u, relevance), record)
    return maps, _on_grid(np.stack(per_head, axis=1), record) if heads else None


def gradxinput(images: np.ndarray, input_grad: np.ndarray, record: Attribution) -> np.ndarray:
    """|x * dy/dx| summed over the channels and each grid cell's pixels: (batch, rows, columns)."""
    (gh, gw), (ph, pw) = record.grid, record.patch
    saliency = np.abs(images.astype(np.float64) * input_grad).sum(axis=1)[:, :gh * ph, :gw * pw]  # (b, h, w)
    return saliency.reshape(-1, gh, ph, gw, pw).sum(axis=(2, 4))


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

def export_weights(manifest: Manifest) -> dict[str, np.ndarray]:
    """The export's trainable weights (weights.safetensors): what version 0 serves."""
    stored = load_file(str(manifest.path(WEIGHTS)))
    return {n: stored[n] for n in manifest.trainable}


def published_weights(manifest: Manifest, model_path: Path) -> dict[str, np.ndarray]:
    """A published version's trainable weights: its inference model's initializers named as the parameters (a
    published model keeps them; the export's own inference.onnx is version 0: use export_weights)."""
    wanted = set(manifest.trainable)
    graph = onnx.load(str(model_path)).graph
    found = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in wanted}
    missing = [n for n in manifest.trainable if n not in found]
    if missing:
        raise FailedPrecondition(f"{model_path.name} holds no initializer {missing[0]!r}: its weights cannot be read "
                                 "by name (version 0 is the export's: use its weights.safetensors)")
    return found


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------

class AttributionEngine:
    """attribution_model.onnx of one export in an InferenceSession (any execution provider); numpy in and out.
    Changes no state: thread-safe as ORT's Run is."""

    def __init__(self, manifest: Manifest, device: str = "cpu", options: ort.SessionOptions | None = None):
        if manifest.attribution is None:
            raise FailedPrecondition(f"model {manifest.name} was exported without an attribution graph: re-run the "
                                     "export")
        manifest.verify_files((ATTRIBUTION_MODEL,))
        self.manifest, self.record = manifest, manifest.attribution
        try:
            self._session = open_session(str(manifest.path(ATTRIBUTION_MODEL)),
                                         options or session_options(training=False), device)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT's own error types: one line for the operator
            raise ConfigError(f"onnxruntime {ort.__version__} cannot load {ATTRIBUTION_MODEL}: "
                              f"{str(e).strip().splitlines()[0]}") from None
        blocks = self.record.blocks
        self._outputs = [LOGITS, *(attention_name(i) for i in range(blocks)),
                         *(attention_grad_name(i) for i in range(blocks)), INPUT_GRAD]
        inputs = [i.name for i in self._session.get_inputs()]
        if inputs != [manifest.input_name, TARGET, *manifest.trainable] or \
                [o.name for o in self._session.get_outputs()] != self._outputs:
            raise ConfigError(f"{ATTRIBUTION_MODEL} does not fit the manifest: re-run the export")
        self._export_weights: dict[str, np.ndarray] | None = None

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def _weights(self, weights: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if weights is None:
            if self._export_weights is None:
                self._export_weights = export_weights(self.manifest)
            return self._export_weights
        shapes = {p.name: tuple(p.shape) for p in self.manifest.parameters}
        out = {}
        for name in self.manifest.trainable:
            if name not in weights:
                raise InvalidArgument(f"weights: no tensor {name!r}")
            value = np.ascontiguousarray(weights[name], dtype=np.float32)
            if value.shape != shapes[name]:
                raise InvalidArgument(f"weights: {name} is {list(value.shape)}, the model's is {list(shapes[name])}")
            out[name] = value
        return out

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        expected = tuple(self.manifest.input_shape[1:])
        if not isinstance(images, np.ndarray) or images.dtype != np.float32:
            raise InvalidArgument(f"images: dtype must be FLOAT32 (normalized pixels), got "
                                  f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise InvalidArgument(f"images: shape must be [batch, {', '.join(map(str, expected))}], "
                                  f"got {list(images.shape)}")
        if not len(images):
            raise InvalidArgument("images: the batch is empty")
        return np.ascontiguousarray(images)

    def _check_target(self, target, batch: int) -> np.ndarray:
        target = np.asarray(target)
        if target.dtype.kind not in "iu":
            raise InvalidArgument(f"target: dtype must be INT64, got {target.dtype}")
        if target.shape != (batch,):
            raise InvalidArgument(f"target: shape must be [{batch}] (one per image), got {list(target.shape)}")
        classes = self.manifest.num_classes
        out_of_range = target[(target < 0) | (target >= classes)]
        if out_of_range.size:
            raise InvalidArgument(f"target: must be in [0, {classes}), got {int(out_of_range[0])}")
        return target.astype(np.int64)

    def run(self, images: np.ndarray, target, weights: Mapping[str, np.ndarray] | None = None) -> Outputs:
        """The graph's outputs for `images` (float32 (b, c, h, w)) and `target` (int (b,)) at `weights` (the
        trainable parameters by name; None: the export's)."""
        images = self._check_images(images)
        target = self._check_target(target, len(images))
        feeds = {self.manifest.input_name: images, TARGET: target, **self._weights(weights)}
        values = self._session.run(self._outputs, feeds)
        blocks = self.record.blocks
        return Outputs(values[0], values[1:1 + blocks], values[1 + blocks:1 + 2 * blocks], values[-1])

    def attribute(self, images: np.ndarray, target=None, method: str = "rollout", heads: bool = False,
                  weights: Mapping[str, np.ndarray] | None = None) -> list[ImageAttribution]:
        """Per image: the `method`'s map on the grid, the class it explains (`target`, None: the predicted class) and,
        with `heads`, the per-head maps (module docstring). InvalidArgument for an unknown method, a target out of
        range or per-head maps of gradxinput; FailedPrecondition for rollout or chefer on a model without
        attention maps."""
        if method not in METHODS:
            raise InvalidArgument(f"method: unknown attribution method {method!r}; the methods are "
                                  f"{', '.join(METHODS)}")
        if heads and method not in ATTENTION_METHODS:
            raise InvalidArgument(f"heads: per-head maps need an attention method ({' or '.join(ATTENTION_METHODS)}), "
                                  f"not {method}")
        if method in ATTENTION_METHODS:
            require_maps(self.record, method)
        images = self._check_images(images)
        if target is None:  # the predicted class: the logits first (ORT runs only what they need)
            feeds = {self.manifest.input_name: images, TARGET: np.zeros(len(images), np.int64),
                     **self._weights(weights)}
            target = self._session.run([LOGITS], feeds)[0].argmax(axis=1).astype(np.int64)
        outputs = self.run(images, target, weights)
        target = np.asarray(target, np.int64)
        per_head = None
        if method == "rollout":
            maps, per_head = rollout(outputs.attentions, self.record, heads)
        elif method == "chefer":
            maps, per_head = chefer(outputs.attentions, outputs.attention_grads, self.record, heads)
        else:
            maps = gradxinput(images, outputs.input_grad, self.record)
        names = self.manifest.class_names
        return [ImageAttribution(maps[i].astype(np.float32), int(target[i]), names[int(target[i])],
                                 per_head[i].astype(np.float32) if per_head is not None else None)
                for i in range(len(images))]
