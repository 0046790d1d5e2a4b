"""The `ort` trainer: PyTorch's own autograd, exported as a graph of plain ONNX ops, on any onnxruntime.

The export (model/gradgraph.py) writes gradient_model.onnx: images, labels and every trainable parameter
in; the loss, the logits and every trainable parameter's gradient out. Any onnxruntime InferenceSession
runs it, on any execution provider: the maintained runtime, no training build. forward_model.onnx is the
eval-mode forward with the same parameter inputs (EvalStep, Publish).

The weights, the gradients and the optimizer's moments are flat float32 vectors in model order
(gradients.FlatLayout), bound to the session by IOBinding (engine/train/buffers.py): on the CPU the trainer's own
numpy buffers, read and written in place, updated by engine/train/optim.py; on CUDA OrtValues in device memory that
stay there between steps, updated by the optimizer's ONNX graph on the same device.

Checkpoints are safetensors files any runtime reads: every trainable weight under its PyTorch name (a
state_dict for `load_state_dict(strict=False)`), the optimizer's moments as `exp_avg.<name>` and
`exp_avg_sq.<name>`, and in the metadata the optimizer's step and the engine's state.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from engine.graph import heads, rewrite
from engine.train import gradients
from engine.train.buffers import DeviceBuffers, HostBuffers
from engine.errors import ConfigError, FailedPrecondition
from engine.manifest import FORWARD_MODEL, GRADIENT_MODEL, WEIGHTS, Manifest
from engine.runtime import open_session, parse_device

FORMAT = "vitserve-ort-checkpoint-1"  # the metadata's "format": what this module writes and reads
STATE_KEY, STEP_KEY = "vitserve_state", "optimizer_step"  # metadata keys: engine state JSON, optimizer step
OUT_PROJECTION = "attention.out"  # the sub-layer of the attention's output projection (model/layout.py)


class CheckpointError(RuntimeError):
    """A checkpoint file this trainer cannot load (the message says which and why; it names "checkpoint")."""


def write_checkpoint(path: Path, weights: dict[str, np.ndarray], optimizer_state: dict[str, dict[str, np.ndarray]],
                     optimizer_step: int, engine_state: str | None) -> None:
    """One safetensors file: weights by name, then `<moment>.<name>` for each optimizer moment."""
    tensors = dict(weights)
    for moment, values in optimizer_state.items():
        tensors.update({f"{moment}.{name}": v for name, v in values.items()})
    metadata = {"format": FORMAT, STEP_KEY: str(optimizer_step)}
    if engine_state is not None:
        metadata[STATE_KEY] = engine_state
    data = save(tensors, metadata=metadata)  # serialized here, written by Python: a full disk is an OSError (ENOSPC)
    with open(path, "wb") as f:
        f.write(data)


def write_initial_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """The export's starting point (weights.safetensors): the trainable weights, no optimizer state, step 0."""
    write_checkpoint(path, {n: np.ascontiguousarray(w, np.float32) for n, w in weights.items()}, {}, 0, None)


def runnable_gradient_graph(manifest: Manifest) -> onnx.ModelProto:
    """The gradient graph as the trainer's session runs it, the same function with faster copies: the attention's
    matrix transposes moved where ORT folds them into its matmuls (rewrite.transposes_into_matmuls), a fused qkv
    projection cut into heads (and its gradient joined) by one transpose (rewrite.heads_in_one_transpose), and the
    patch cut's transpose in two block copies (rewrite.split_transposes). The file itself keeps the traced
    structure, which ExplainGradients reads."""
    proto = onnx.load(str(manifest.path(GRADIENT_MODEL)))
    rewrite.transposes_into_matmuls(proto)
    rewrite.heads_in_one_transpose(proto)
    rewrite.split_transposes(proto, manifest.input_name, tuple(manifest.input_shape))
    return proto


def with_batch_size(proto: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of the graph whose inputs and outputs have `batch` rows: every dimension that is a name (the export
    names only the batch) becomes `batch`, and the traced intermediate shapes are dropped for the runtime to infer."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in (*fixed.graph.input, *fixed.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_value = batch
    del fixed.graph.value_info[:]
    return fixed


class GradientGraphBackend:
    name = "ort"
    # On OpenVINO one session per batch size, the newest few kept: its CPU plugin cannot compile a convolution's
    # weight gradient (the batch becomes a channel) for a dynamic batch, and the graphs of fixed shapes it can
    # compile run a train step 1.3-1.6x faster (docs/performance.md).
    STATIC_SESSIONS = 4

    def __init__(self, manifest: Manifest, device: str, options: ort.SessionOptions, flat: gradients.FlatLayout,
                 resident: bool | None = None):
        """`resident`: keep the weights, gradients and moments on the session's device and update them there
        (DeviceBuffers); None: exactly when the device is CUDA."""
        self._manifest = manifest
        self._flat = flat
        self._names = [p.name for p in flat.params]
        self._shapes = [p.shape for p in flat.params]
        size = int(flat.sizes.sum())
        self._snapshots = (np.empty(size, np.float32), np.empty(size, np.float32))
        kind, _ = parse_device(device)
        self._device, self._options = device, options
        # OpenVINO's execution provider copies a bound input when it is bound, not when the graph runs: it would
        # keep training on the first step's weights unless the parameters are bound again before each run.
        self._rebind = kind == "openvino"
        graph = runnable_gradient_graph(manifest)
        if resident is None:
            resident = kind == "cuda"
        self._buffers = (DeviceBuffers(flat, manifest.optimizer, device, options) if resident
                         else HostBuffers(flat, manifest.optimizer))
        self._grads = np.zeros(size, np.float32)  # the last forward_backward's gradient, on the host
        self._forward = self._forward_binding = None  # forward_model.onnx's session, opened on the first EvalStep
        # One session and binding for every batch size; on OpenVINO instead the graph, kept to compile it for each
        # batch size, and the newest sessions by batch size.
        self._run: tuple[ort.InferenceSession, ort.IOBinding] | None = None
        self._graph: onnx.ModelProto | None = None
        self._static: OrderedDict[int, tuple[ort.InferenceSession, ort.IOBinding]] | None = None
        if kind == "openvino":
            self._graph, self._static = graph, OrderedDict()
            self._gradient_run(1)  # a batch of one compiled now: a model OpenVINO cannot run fails at startup
        else:
            session = self._open(graph)
            self._run = (session, self._bind(session, outputs=True))
        self._head_outputs = None
        self._frozen_values = None  # read from the gradient graph when first asked for

    # -- sessions and binding ---------------------------------------------------------------------------

    def _open(self, graph: onnx.ModelProto) -> ort.InferenceSession:
        try:
            session = open_session(graph.SerializeToString(), self._options, self._device)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT's own error types: one line for the operator
            raise ConfigError(f"onnxruntime {ort.__version__} cannot load {GRADIENT_MODEL}: "
                              f"{str(e).strip().splitlines()[0]}") from None
        self._check_signature(session)
        return session

    def _gradient_run(self, batch: int) -> tuple[ort.InferenceSession, ort.IOBinding]:
        """The session and binding that run a batch of `batch` images."""
        if self._static is None:
            return self._run
        run = self._static.pop(batch, None)
        if run is None:
            session = self._open(with_batch_size(self._graph, batch))
            run = (session, self._bind(session, outputs=True))
        self._static[batch] = run  # the newest last
        while len(self._static) > self.STATIC_SESSIONS:
            self._static.popitem(last=False)
        return run

    def _check_signature(self, session: ort.InferenceSession) -> None:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        want_in = [self._manifest.input_name, "labels", *self._names]
        want_out = ["loss", self._manifest.output_name, *(f"{n}_grad" for n in self._names)]
        if inputs != want_in or outputs != want_out:
            raise ConfigError(f"{GRADIENT_MODEL} does not fit the manifest's trainable parameters "
                              f"(inputs {inputs[:4]}..., outputs {outputs[:4]}...): re-run the export")

    def _views(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[a:b].reshape(s) for (a, b), s in zip(self._flat.spans, self._shapes)]

    def _bind(self, session: ort.InferenceSession, outputs: bool) -> ort.IOBinding:
        """The parameters (and with `outputs` the loss, the logits and the gradients) bound for good to the buffers."""
        binding = session.io_binding()
        self._buffers.bind_parameters(binding)
        if outputs:  # loss and logits first (outputs 0 and 1): rebinding them each step keeps their places
            binding.bind_output("loss", "cpu")
            binding.bind_output(self._manifest.output_name, "cpu")
            self._buffers.bind_gradients(binding)
        return binding

    # -- state ------------------------------------------------------------------------------------------

    def load(self, checkpoint: Path | None) -> str | None:
        """Weights (and optimizer state) from a checkpoint, None: the export's weights; the saved engine state."""
        path = Path(checkpoint or self._manifest.path(WEIGHTS))
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise CheckpointError(f"checkpoint {path.name} is not a vitserve ort checkpoint "
                                          f"(format {metadata.get('format')!r})")
                step = int(metadata.get(STEP_KEY, "0"))
                weights = self._read(f, "")
                moments = {m: self._read(f, f"{m}.") for m in self._buffers.moments()} if step else {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path.name} cannot be read: {e}") from None
        self._buffers.load(weights, moments, step)
        return metadata.get(STATE_KEY)

    def _read(self, f, prefix: str) -> np.ndarray:
        """The tensors `prefix + name`, flat in model order; CheckpointError naming the first missing or misfit one."""
        keys = set(f.keys())
        flat = np.empty(int(self._flat.sizes.sum()), np.float32)
        for name, (a, b), shape in zip(self._names, self._flat.spans, self._shapes):
            key = prefix + name
            if key not in keys:
                raise CheckpointError(f"checkpoint has no tensor {key!r}")
            value = f.get_tensor(key)
            if tuple(value.shape) != tuple(shape) or value.dtype != np.float32:
                raise CheckpointError(f"checkpoint tensor {key!r} is {value.dtype} {list(value.shape)}, "
                                      f"the model's is float32 {list(shape)}")
            flat[a:b] = value.reshape(-1)
        return flat

    def save(self, path: Path, engine_state: str) -> None:
        state = {m: dict(zip(self._names, self._views(v))) for m, v in self._buffers.moments().items()}
        write_checkpoint(path, dict(zip(self._names, self._views(self._buffers.weights()))), state,
                         self._buffers.step, engine_state)

    def snapshot(self, slot: int) -> np.ndarray:
        buffer = self._snapshots[slot]
        np.copyto(buffer, self._buffers.weights())
        return buffer

    def parameter(self, name: str) -> np.ndarray:
        if name in self._names:
            i = self._names.index(name)
            a, b = self._flat.spans[i]
            return self._buffers.weights()[a:b].reshape(self._shapes[i]).copy()
        return self._frozen()[name].copy()

    def parameter_names(self) -> list[str]:
        return [*self._names, *(n for n in self._frozen() if n not in self._names)]

    def _frozen(self) -> dict[str, np.ndarray]:
        """The frozen parameters: initializers of the gradient graph under their manifest names."""
        if self._frozen_values is None:
            wanted = {p.name for p in self._manifest.parameters if not p.trainable}
            graph = onnx.load(str(self._manifest.path(GRADIENT_MODEL))).graph
            self._frozen_values = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in wanted}
        return self._frozen_values

    # -- steps ------------------------------------------------------------------------------------------

    def forward_backward(self, images: np.ndarray, labels: np.ndarray, head_importance: bool
                         ) -> tuple[float, np.ndarray, tuple[np.ndarray, ...]]:
        """This batch's loss, its gradient (flat: the backend's buffer, valid until the next call) and, when asked
        for, each attention module's head sums."""
        outputs = self.head_outputs() if head_importance else ()  # refused before anything runs
        session, binding = self._gradient_run(len(images))
        if self._rebind:
            self._buffers.bind_parameters(binding)
        binding.bind_cpu_input(self._manifest.input_name, images)
        binding.bind_cpu_input("labels", labels)
        binding.bind_output("loss", "cpu")  # ORT allocates these two anew: their shape follows the batch
        binding.bind_output(self._manifest.output_name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        loss = float(values[0].numpy())
        self._grads = self._buffers.gradients(values)
        sums = tuple(self._head_sums(o) for o in outputs)
        return loss, self._grads, sums

    def update(self, grads: np.ndarray, lr: float, fresh: bool) -> None:
        self._buffers.update(grads, lr, fresh)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean cross-entropy (float64) and logits of the eval-mode forward graph at the current weights."""
        if self._forward is None:
            self._forward = open_session(str(self._manifest.path(FORWARD_MODEL)), self._options, self._device)
            self._forward_binding = self._bind(self._forward, outputs=False)
        binding = self._forward_binding
        if self._rebind:
            self._buffers.bind_parameters(binding)
        binding.bind_cpu_input(self._manifest.input_name, images)
        binding.bind_output(self._manifest.output_name, "cpu")
        self._forward.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(labels)), labels].mean()), logits

    # -- head importance --------------------------------------------------------------------------------

    def head_outputs(self) -> list[heads.HeadOutput]:
        """Each attention module's output projection W_o, whose input is the heads' outputs side by side.

        For o entering the network only through y = o W_o^T + b, sum over batch and tokens of o_h * dL/d o_h
        equals sum over W_o's columns of head h of W_o * dL/dW_o: the importance needs nothing but a weight
        and its gradient, which the gradient graph already gives."""
        if self._head_outputs is None:
            m = self._manifest
            if not m.qkv:
                raise FailedPrecondition("this model has no attention modules: there is no head importance")
            found = []
            for layout in m.qkv:
                candidates = [p for p in m.parameters if p.block == layout.block and p.sublayer == OUT_PROJECTION
                              and len(p.shape) == 2 and p.shape[1] == layout.inner]
                if len(candidates) != 1:
                    raise FailedPrecondition(f"attention module {layout.module or layout.name}: its output projection "
                                             "was not found, so head importance cannot be computed")
                if not candidates[0].trainable:
                    raise FailedPrecondition(f"head importance on the ort trainer reads the gradient of the attention "
                                             f"output projection {candidates[0].name}, which is frozen")
                found.append(heads.HeadOutput(layout.block, layout.module or layout.name, layout.heads,
                                              candidates[0].name))
            self._head_outputs = found
        return self._head_outputs

    def _head_sums(self, output: heads.HeadOutput) -> np.ndarray:
        i = self._names.index(output.tensor)
        a, b = self._flat.spans[i]
        rows, inner = self._shapes[i]
        product = self._buffers.weights()[a:b].astype(np.float64) * self._grads[a:b]
        return product.reshape(rows, output.heads, inner // output.heads).sum(axis=(0, 2))

    # -- publishing -------------------------------------------------------------------------------------

    def export_inference_model(self, path: Path, output_name: str) -> None:
        """forward_model.onnx with the current trainable weights as initializers: a self-contained inference model."""
        model = onnx.load(str(self._manifest.path(FORWARD_MODEL)))
        trainable = dict(zip(self._names, self._views(self._buffers.weights())))
        kept = [i for i in model.graph.input if i.name not in trainable]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in trainable.items())
        onnx.save(model, str(path))
