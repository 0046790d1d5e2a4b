"""Arbitrary requests against a real server (hypothesis): every call succeeds or gets a client-error status,
never INTERNAL, and the training state equals a replay of only the accepted requests.

Requests: Predict (tensor or encoded), TrainStep, EvalStep, SetOptimizer, Publish, SaveCheckpoint and
RestoreCheckpoint with valid and invalid fields."""
from __future__ import annotations

import pytest
import contextlib
import tempfile
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from server.app import create_server
from server.config import Settings
from server.dataplane import DataPlane

pytestmark = pytest.mark.slow

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION}
DTYPES = [pb.FLOAT32, pb.FLOAT64, pb.FLOAT16, pb.INT64, pb.INT32, pb.UINT8, pb.DATA_TYPE_UNSPECIFIED, 99]
ITEM = {pb.FLOAT32: 4, pb.FLOAT64: 8, pb.FLOAT16: 2, pb.INT64: 8, pb.INT32: 4, pb.UINT8: 1}


@contextlib.contextmanager
def server(artifacts: Path):
    with tempfile.TemporaryDirectory() as data:
        settings = Settings.from_env(environ={}, artifacts=artifacts, host="127.0.0.1", port=0, data_dir=Path(data),
                                     max_batch_size=16, max_message_mb=1, metrics_port=-1)
        plane = DataPlane(settings)
        grpc_server, port = create_server(settings, plane)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield plane, vitserve_pb2_grpc.VitServeStub(channel)
        grpc_server.stop(None)
        plane.close()


@st.composite
def tensors(draw, good_shape):
    """Half well-formed FLOAT32 image batches, half anything: dtype, shape, byte count, NaN/Inf/huge values."""
    if draw(st.booleans()):
        rows = draw(st.integers(1, 6))
        array = np.random.default_rng(draw(st.integers(0, 2 ** 16))).standard_normal(
            (rows, *good_shape[1:])).astype(np.float32)
        return pb.Tensor(dtype=pb.FLOAT32, shape=array.shape, data=array.tobytes())
    dtype = draw(st.sampled_from([pb.FLOAT32] * 4 + DTYPES))
    if draw(st.booleans()):
        shape = [draw(st.integers(0, 6)), *good_shape[1:]]
    else:
        shape = draw(st.lists(st.integers(-2, 10 ** 6), min_size=0, max_size=5))
    count = int(np.prod([max(d, 0) for d in shape], dtype=np.float64)) if shape else 1
    n = count if 0 <= count <= 4096 else 7  # a huge claimed shape travels with a few bytes
    values = draw(st.sampled_from(["normal", "nan", "inf", "huge", "zeros"]))
    array = np.random.default_rng(draw(st.integers(0, 2 ** 16))).standard_normal(n).astype(np.float32)
    array = {"normal": array, "nan": np.where(array > 1, np.nan, array), "inf": np.where(array > 1, np.inf, array),
             "huge": np.full_like(array, 3e38), "zeros": np.zeros_like(array)}[values].astype(np.float32)
    data = array.tobytes()
    if dtype != pb.FLOAT32 and dtype in ITEM:
        data = np.zeros(n * ITEM[dtype], np.uint8).tobytes()
    cut = draw(st.sampled_from([0, 0, 0, 1, 3]))
    return pb.Tensor(dtype=dtype, shape=shape, data=data[:len(data) - cut] if cut else data)


@st.composite
def requests(draw, good_shape):
    kind = draw(st.sampled_from(["predict", "train", "train", "eval", "save", "restore", "encoded", "optimizer",
                                 "publish"]))
    images = pb.Images(tensor=draw(tensors(good_shape)))
    rows = max(0, images.tensor.shape[0]) if images.tensor.shape else 0
    if draw(st.booleans()):  # well-formed labels for the batch
        labels = np.asarray(draw(st.lists(st.integers(0, 9), min_size=min(rows, 20), max_size=min(rows, 20))),
                            dtype=np.int64)
        label_tensor = pb.Tensor(dtype=pb.INT64, shape=[len(labels)], data=labels.tobytes())
    else:
        labels = np.asarray(draw(st.lists(st.integers(-3, 12), min_size=max(0, min(rows, 20) - 1),
                                          max_size=min(rows, 20) + 1)), dtype=np.int64)
        label_tensor = pb.Tensor(dtype=draw(st.sampled_from([pb.INT64] * 5 + [pb.INT32])), shape=[len(labels)],
                                 data=labels.tobytes())
    name = draw(st.sampled_from(["ok-name", "", "../x", "a/b", ".hidden", "x" * 70, "unknown"]))
    if kind == "predict":
        return "Predict", pb.PredictRequest(images=images, top_k=draw(st.integers(0, 20)))
    if kind == "encoded":
        blobs = draw(st.lists(st.binary(max_size=64), max_size=3))
        return "Predict", pb.PredictRequest(images=pb.Images(encoded=pb.EncodedImages(images=blobs)))
    if kind == "train":
        return "TrainStep", pb.TrainStepRequest(images=images, labels=label_tensor,
                                                accumulate_only=draw(st.booleans()),
                                                omit_gradient_summaries=draw(st.booleans()))
    if kind == "eval":
        return "EvalStep", pb.EvalStepRequest(images=images, labels=label_tensor)
    if kind == "optimizer":
        number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-3, 0.0, -1.0]))
        request = pb.SetOptimizerRequest()
        if draw(st.booleans()):
            request.learning_rate = draw(number)
        if draw(st.booleans()):
            request.schedule.CopyFrom(pb.LinearSchedule(peak_lr=draw(number), warmup_steps=draw(st.integers(-2, 5)),
                                                        decay_steps=draw(st.integers(-2, 5)), end_lr=draw(number)))
        if draw(st.booleans()):
            request.clip_grad_norm = draw(number)
        return "SetOptimizer", request
    if kind == "publish":
        return "Publish", pb.PublishRequest()
    if kind == "save":
        return "SaveCheckpoint", pb.SaveCheckpointRequest(name=name)
    return "RestoreCheckpoint", pb.RestoreCheckpointRequest(name=name)


def test_arbitrary_requests_get_client_errors_and_replay_to_the_same_state(exported):
    artifacts = exported[0]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(requests((-1, 1, 8, 8)), min_size=1, max_size=8))
    def run(program):
        accepted = []
        with server(artifacts) as (plane, stub):
            for method, request in program:
                try:
                    getattr(stub, method)(request, timeout=30)
                    accepted.append((method, request))
                except grpc.RpcError as e:
                    assert e.code() in CLIENT_ERRORS, (method, e.code(), e.details())
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).name  # still up
            engine = plane.trainer("fuzz").engine
            state, step = engine.parameters(), engine.step
        with server(artifacts) as (plane, stub):  # replay what was accepted, on a fresh server
            for method, request in accepted:
                getattr(stub, method)(request, timeout=30)
            engine = plane.trainer("fuzz").engine
            assert engine.step == step
            replayed = engine.parameters()
            assert all(np.array_equal(state[n], replayed[n], equal_nan=True) for n in state)

    run()
