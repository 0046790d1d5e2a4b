"""Inference engine: one ONNX Runtime session over inference.onnx. numpy in, numpy out; thread-safe."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.runtime import open_session


class InferenceEngine:
    def __init__(self, model_path, input_name: str, output_name: str, device: str, options: ort.SessionOptions):
        self.path = Path(model_path)  # the ONNX file (a published version's weights are its initializers)
        self._session = open_session(str(model_path), options, device)
        self._input_name = input_name
        self._output_name = output_name

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def logits(self, images: np.ndarray) -> np.ndarray:
        """images: float32 (b, c, h, w) -> logits float32 (b, classes). ORT's Run is safe to call concurrently."""
        return self._session.run([self._output_name], {self._input_name: images})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities), each (b, k), best first."""
    probs = softmax(logits.astype(np.float64))
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=-1)
