"""Requests -> validated numpy batches: the one place a request's payload is decoded and checked.

Raw tensor bytes, encoded images (proto/images.py, Pillow) and KServe v2 input tensors are checked against the model
(dtype, shape, byte count, finiteness, labels, batch limits) before anything runs, so the data plane
only ever sees validated batches. Pure: numpy, Pillow and the proto messages, no grpc and no ONNX
Runtime, so it can be fuzzed on its own (tests/fuzz). Every problem is an InvalidArgument naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidArgument
from proto import open_inference_pb2 as v2
from proto import vitserve_pb2 as pb
from proto.images import ImageError, decode_batch
from proto.records.model import Preprocessing
from proto.tensors import array_view, dtype_name

FP32 = "FP32"  # the v2 protocol's name of float32


def decode_tensor(what: str, dtype: str, shape, data: bytes) -> np.ndarray:
    """A read-only view over `data` (no copy) with the given dtype name and shape (proto/tensors.py); a problem is an
    InvalidArgument naming the field (`what`: "images", "labels")."""
    try:
        return array_view(dtype, shape, data)
    except ValueError as e:
        raise InvalidArgument(f"{what}: {e}") from None


def decode_images(encoded: list[bytes], prep: Preprocessing) -> np.ndarray:
    """Encoded files -> float32 (b, c, h, w) by the model's preprocessing (proto/images.py, the client's decoder
    too); a bad image is an InvalidArgument naming it ("image 3: ...")."""
    try:
        return decode_batch(encoded, prep)
    except ImageError as e:
        raise InvalidArgument(str(e)) from None


@dataclass(frozen=True)
class BatchValidator:
    """Checks inference payloads against one model's input; the front doors' only way from a request to a batch."""
    input_shape: tuple[int, ...]  # (-1, C, H, W)
    num_classes: int
    max_batch_size: int
    preprocessing: Preprocessing

    # -- whole requests ---------------------------------------------------------------------------

    def images(self, images: pb.Images) -> np.ndarray:
        """vitserve.v1 Images (a tensor or encoded files) -> float32 (b, c, h, w)."""
        source = images.WhichOneof("source")
        if source is None:
            raise InvalidArgument("images: none given (set images.tensor or images.encoded)")
        if source == "encoded":
            return self.images_from_files(list(images.encoded.images))
        t = images.tensor
        return self.images_from_tensor(dtype_name(t.dtype), list(t.shape), t.data)

    def v2_images(self, request: v2.ModelInferRequest, input_name: str) -> np.ndarray:
        """The one FP32 input of a KServe v2 ModelInferRequest, from raw_input_contents or contents.fp32_contents."""
        if len(request.inputs) != 1:
            raise InvalidArgument(f"inputs: the model takes exactly 1 input ('{input_name}'), got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != input_name:
            raise InvalidArgument(f"inputs: unknown input '{tensor.name}'; the model's input is '{input_name}'")
        if tensor.datatype != FP32:
            raise InvalidArgument(f"input '{input_name}': datatype must be FP32 (normalized pixels), "
                                  f"got '{tensor.datatype}'")
        typed = tensor.contents
        others = [f.name for f, _ in typed.ListFields() if f.name != "fp32_contents"]
        if others:
            raise InvalidArgument(f"input '{input_name}': FP32 data goes in contents.fp32_contents, not {others[0]}")
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise InvalidArgument(f"raw_input_contents: {len(request.raw_input_contents)} entries for "
                                      f"{len(request.inputs)} input")
            if typed.fp32_contents:
                raise InvalidArgument(f"input '{input_name}': data given both in raw_input_contents and in contents")
            data = request.raw_input_contents[0]
        elif typed.fp32_contents:
            data = np.asarray(typed.fp32_contents, dtype="<f4").tobytes()
        else:
            raise InvalidArgument(f"input '{input_name}': no data (set raw_input_contents or contents.fp32_contents)")
        return self.images_from_tensor("FLOAT32", list(tensor.shape), data)

    # -- payloads ---------------------------------------------------------------------------------

    def images_from_tensor(self, dtype: str, shape, data: bytes) -> np.ndarray:
        """A raw FLOAT32 (b, c, h, w) tensor, checked against the model's input (a view over `data`)."""
        if dtype != "FLOAT32":
            raise InvalidArgument(f"images: dtype must be FLOAT32 (normalized pixels), got {dtype}")
        expected = self.input_shape[1:]
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise InvalidArgument(f"images: shape must be [batch, {', '.join(map(str, expected))}], got {list(shape)}")
        images = decode_tensor("images", dtype, shape, data)
        self.check_batch(len(images))
        if not np.isfinite(images).all():
            bad = int(np.count_nonzero(~np.isfinite(images)))
            raise InvalidArgument(f"images: {bad} pixel values are NaN or Inf")
        return images

    def images_from_files(self, encoded: list[bytes]) -> np.ndarray:
        self.check_batch(len(encoded))
        return decode_images(encoded, self.preprocessing)

    def check_batch(self, size: int) -> None:
        if size == 0:
            raise InvalidArgument("images: the batch is empty")
        if size > self.max_batch_size:
            raise InvalidArgument(f"images: batch of {size} is over the maximum of {self.max_batch_size}")


@dataclass(frozen=True)
class TrainingBatchValidator(BatchValidator):
    """Checks labelled batches (TrainStep, EvalStep, HeadImportance) against the trained model: its images as
    BatchValidator checks them, and one label per image, each a class of the model."""

    def labelled(self, request: pb.TrainStepRequest | pb.EvalStepRequest | pb.HeadImportanceRequest
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of a TrainStep, EvalStep or HeadImportance request."""
        images = self.images(request.images)
        if not request.HasField("labels"):
            raise InvalidArgument("labels: none given (an INT64 tensor [batch])")
        t = request.labels
        return images, self.labels_from_tensor(dtype_name(t.dtype), list(t.shape), t.data, batch=len(images))

    def labels_from_tensor(self, dtype: str, shape, data: bytes, batch: int) -> np.ndarray:
        if dtype != "INT64":
            raise InvalidArgument(f"labels: dtype must be INT64, got {dtype}")
        labels = decode_tensor("labels", dtype, shape, data)
        if labels.shape != (batch,):
            raise InvalidArgument(f"labels: shape must be [{batch}] (one per image), got {list(labels.shape)}")
        out_of_range = labels[(labels < 0) | (labels >= self.num_classes)]
        if out_of_range.size:
            raise InvalidArgument(f"labels: must be in [0, {self.num_classes}), got {int(out_of_range[0])}")
        return labels
