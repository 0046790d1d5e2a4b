"""Where the `ort` trainer keeps its flat weights, gradients and optimizer moments, and how it updates them.

Two places, one interface (engine/train/graph_backend.py uses either):

* `HostBuffers`, on the CPU: numpy vectors that ONNX Runtime reads and writes in place through IOBinding (the
  weights as the gradient graph's parameter inputs, the gradients as its outputs), and the optimizer of
  engine/train/optim.py updating the weights in place. Nothing but the batch is copied per step.
* `DeviceBuffers`, on an execution provider's device (CUDA): the weights, the gradients and both moments are
  OrtValues in device memory, bound by address, so they never leave the device between steps. The optimizer
  is an ONNX graph (optim.update_graph: the same arithmetic as engine/train/optim.py, op for op) run on the same
  device, double-buffered: it reads the weights and moments of one set and writes the other, and the
  parameter inputs are rebound to the new set. Per step the gradient comes to the host once, because the
  step function's non-finite guard, clipping and summaries read it; it goes back only when the step changed
  it (accumulated or clipped). The same class runs on the CPU execution provider, which is how the tests
  check it against HostBuffers on machines without a GPU.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from engine.runtime import open_session, parse_device
from engine.train import gradients, optim

FLOAT = np.dtype(np.float32).itemsize


class HostBuffers:
    """Flat numpy vectors bound to the session in place; the numpy optimizer updates the weights in place."""

    def __init__(self, flat: gradients.FlatLayout, optimizer: dict):
        self._flat = flat
        size = int(flat.sizes.sum())
        self._weights = np.empty(size, np.float32)
        self._grads = np.empty(size, np.float32)
        self._optimizer = optim.build(optimizer, size)

    def bind_parameters(self, binding: ort.IOBinding) -> None:
        for p, (a, b) in zip(self._flat.params, self._flat.spans):
            binding.bind_input(p.name, "cpu", 0, np.float32, list(p.shape), self._weights[a:b].ctypes.data)

    def bind_gradients(self, binding: ort.IOBinding) -> None:
        for p, (a, b) in zip(self._flat.params, self._flat.spans):
            binding.bind_output(f"{p.name}_grad", "cpu", 0, np.float32, list(p.shape), self._grads[a:b].ctypes.data)

    def gradients(self, outputs: list[ort.OrtValue]) -> np.ndarray:
        """The flat gradient the last run wrote (the buffer itself)."""
        return self._grads

    def update(self, grads: np.ndarray, lr: float, fresh: bool) -> None:
        self._optimizer.update(self._weights, grads, lr)

    def weights(self) -> np.ndarray:
        """The current weights (the live buffer: read it, do not keep it across an update)."""
        return self._weights

    def moments(self) -> dict[str, np.ndarray]:
        return self._optimizer.state()

    @property
    def step(self) -> int:
        return self._optimizer.step

    def load(self, weights: np.ndarray, moments: dict[str, np.ndarray], step: int) -> None:
        np.copyto(self._weights, weights)  # in place: the sessions keep reading these buffers
        for name, values in self._optimizer.state().items():
            values[:] = moments.get(name, 0.0)
        self._optimizer.step = step


class DeviceBuffers:
    """Weights, gradients and moments in device memory; the optimizer is an ONNX graph on the same device."""

    def __init__(self, flat: gradients.FlatLayout, optimizer: dict, device: str, options: ort.SessionOptions):
        self._flat = flat
        self._device = parse_device(device)
        size = int(flat.sizes.sum())
        self._hyper = optim.build(optimizer, 0)  # the optimizer's settings and step count (no buffers of its own)
        self._names = list(self._hyper.state())  # the moments: exp_avg, exp_avg_sq for AdamW; none for SGD
        # Two sets of weights + moments: the optimizer graph reads one and writes the other.
        self._sets = [{k: self._alloc(size) for k in ("weights", *self._names)} for _ in range(2)]
        self._current = 0
        self._grads = self._alloc(size)
        self._host_grads = np.empty(size, np.float32)
        self._bindings: list[ort.IOBinding] = []  # every binding whose parameter inputs follow the current set
        self._session = open_session(optim.update_graph(self._hyper).SerializeToString(), options, device)
        self._update_binding = self._session.io_binding()

    def _alloc(self, size: int) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type([size], np.float32, *self._device)

    def _bind_params(self, binding: ort.IOBinding) -> None:
        base = self._sets[self._current]["weights"].data_ptr()
        kind, index = self._device
        for p, a in zip(self._flat.params, self._flat.starts):
            binding.bind_input(p.name, kind, index, np.float32, list(p.shape), base + int(a) * FLOAT)

    def bind_parameters(self, binding: ort.IOBinding) -> None:
        self._bindings.append(binding)
        self._bind_params(binding)

    def bind_gradients(self, binding: ort.IOBinding) -> None:
        base = self._grads.data_ptr()
        kind, index = self._device
        for p, a in zip(self._flat.params, self._flat.starts):
            binding.bind_output(f"{p.name}_grad", kind, index, np.float32, list(p.shape), base + int(a) * FLOAT)

    def gradients(self, outputs: list[ort.OrtValue]) -> np.ndarray:
        """The last run's gradient, copied to the host once (the step's guard and summaries read it)."""
        np.copyto(self._host_grads, self._grads.numpy())
        return self._host_grads

    def update(self, grads: np.ndarray, lr: float, fresh: bool) -> None:
        """One optimizer step on the device. `fresh`: `grads` is the device gradient's host copy, unchanged."""
        if not fresh:
            self._grads.update_inplace(np.ascontiguousarray(grads, np.float32))
        self._hyper.step += 1
        source, target = self._sets[self._current], self._sets[1 - self._current]
        binding = self._update_binding
        binding.bind_ortvalue_input("weights", source["weights"])
        binding.bind_ortvalue_input("grads", self._grads)
        for name in self._names:
            binding.bind_ortvalue_input(name, source[name])
        for name, value in optim.update_scalars(self._hyper, lr).items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_output("new_weights", target["weights"])
        for name in self._names:
            binding.bind_ortvalue_output(f"new_{name}", target[name])
        self._session.run_with_iobinding(binding)
        self._current = 1 - self._current
        for bound in self._bindings:
            self._bind_params(bound)

    def weights(self) -> np.ndarray:
        """A host copy of the current weights."""
        return self._sets[self._current]["weights"].numpy()

    def moments(self) -> dict[str, np.ndarray]:
        """Host copies of the optimizer's moments."""
        return {name: self._sets[self._current][name].numpy() for name in self._names}

    @property
    def step(self) -> int:
        return self._hyper.step

    def load(self, weights: np.ndarray, moments: dict[str, np.ndarray], step: int) -> None:
        current = self._sets[self._current]
        current["weights"].update_inplace(np.ascontiguousarray(weights, np.float32))
        for name in self._names:
            value = moments.get(name)
            current[name].update_inplace(np.zeros(len(weights), np.float32) if value is None
                                         else np.ascontiguousarray(value, np.float32))
        self._hyper.step = step
