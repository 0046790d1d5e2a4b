"""The training engine in a child process (--train-isolation process, the default): the same answers as in the
server process, inference that answers while a step runs, and a clear status when the child dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.train.isolation import IsolatedTrainingEngine
from engine.train.step import TrainingEngine
from proto import vitserve_pb2 as pb
from tests.helpers import TRAINERS, batch, images_msg, tensor


@pytest.fixture(params=TRAINERS)
def trainer(request) -> str:
    """Every test of this file runs on both trainers."""
    return request.param


def steps(server) -> list:
    """The same sequence of training calls, answered as messages."""
    stub = server.stub
    out = [stub.SetOptimizer(pb.SetOptimizerRequest(clip_grad_norm=0.5))]
    for i, (n, accumulate, heads) in enumerate(((6, True, False), (5, False, False), (8, False, True))):
        images, labels = batch(n, seed=40 + i)
        out.append(stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels),
                                                      accumulate_only=accumulate, head_importance=heads)))
    images, labels = batch(7, seed=50)
    out.append(stub.EvalStep(pb.EvalStepRequest(images=images_msg(images), labels=tensor(labels))))
    out.append(stub.HeadImportance(pb.HeadImportanceRequest(images=images_msg(images), labels=tensor(labels))))
    out.append(stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="after-two")))
    train_more = batch(4, seed=60)
    out.append(stub.TrainStep(pb.TrainStepRequest(images=images_msg(train_more[0]), labels=tensor(train_more[1]))))
    out.append(stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="after-two")))
    out.append(stub.Publish(pb.PublishRequest()))
    out.append(stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True)))
    return out


def comparable(message):
    """A message without what differs between any two runs: times and file dates."""
    clone = type(message)()
    clone.CopyFrom(message)
    for field in ("step_seconds", "created_unix"):
        if field in clone.DESCRIPTOR.fields_by_name:
            clone.ClearField(field)
    return clone


def test_isolated_training_answers_exactly_as_in_process_training(serve, tmp_path):
    isolated = serve(data_dir=tmp_path / "a", train_isolation="process")
    local = serve(data_dir=tmp_path / "b", train_isolation="thread")
    assert isinstance(isolated.engine, IsolatedTrainingEngine)
    assert isinstance(local.engine, TrainingEngine)
    assert isolated.engine.pid != os.getpid()
    for a, b in zip(steps(isolated), steps(local), strict=True):
        assert comparable(a) == comparable(b)  # bit for bit: loss, every summary, head scores, logits
    weights_a, weights_b = isolated.engine.parameters(), local.engine.parameters()
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        np.testing.assert_array_equal(weights_a[name], weights_b[name], err_msg=name)
    assert (isolated.engine.step, isolated.engine.learning_rate) == (
        local.engine.step, local.engine.learning_rate)


def test_errors_raised_in_the_child_reach_the_caller_unchanged(running):
    images, labels = batch(3)
    with pytest.raises(grpc.RpcError) as e:
        running.stub.SetOptimizer(pb.SetOptimizerRequest(learning_rate=1e-3, clip_grad_norm=-1.0))
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "clip_grad_norm must be a finite number >= 0 (0 turns clipping off), got -1.0")
    with pytest.raises(grpc.RpcError) as e:
        running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)), timeout=1e-9)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert running.engine.step == 0


def test_predict_answers_while_a_train_step_runs(running):
    """Predict calls complete inside the interval of one long TrainStep (with training in the server process,
    ONNX Runtime's train step holds the GIL and they would all wait for its end)."""
    images, labels = batch(32, seed=3)  # the fixture's largest batch
    one, _ = batch(1, seed=4)
    running.stub.Predict(pb.PredictRequest(images=images_msg(one)))  # warm
    window, stop, finished = {}, threading.Event(), []

    def train():
        try:
            window["start"] = time.monotonic()
            running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels),
                                                       accumulate_only=True))
            for _ in range(10):
                running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
            window["end"] = time.monotonic()
        finally:
            stop.set()

    thread = threading.Thread(target=train)
    thread.start()
    while not stop.is_set():
        running.stub.Predict(pb.PredictRequest(images=images_msg(one)))
        finished.append(time.monotonic())
    thread.join()
    assert "end" in window, "the train steps failed"
    inside = [t for t in finished if window["start"] < t < window["end"]]
    assert len(inside) >= 10, f"{len(inside)} Predict calls finished during {window['end'] - window['start']:.3f}s " \
                              "of training"
    assert running.engine.step == 10


def test_a_dead_training_process_gives_unavailable_and_inference_goes_on(running):
    pid = running.engine.pid
    os.kill(pid, signal.SIGKILL)
    images, labels = batch(4)
    message = (f"the training process {pid} died (killed by signal 9) during train step; restart the server: it "
               "resumes from the newest checkpoint")
    with pytest.raises(grpc.RpcError) as e:
        running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAVAILABLE, message)
    with pytest.raises(grpc.RpcError) as e:  # and every later training call, naming the first failure
        running.stub.GetOptimizer(pb.GetOptimizerRequest())
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAVAILABLE, message)
    assert len(running.stub.Predict(pb.PredictRequest(images=images_msg(images))).predictions) == 4
    health = health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_process_that_trains_runs_numpy_blas_on_one_thread(exported):
    """OpenBLAS's own threads spin after each call on the cores ONNX Runtime's step needs (a digits step took
    twice as long); building a TrainingEngine limits them, in a fresh process as in the training child."""
    folder, _ = exported
    script = (
        "import sys, numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "from engine.manifest import Manifest\n"
        "from engine.runtime import session_options\n"
        "from engine.train.step import TrainingEngine\n"
        "def blas(): return [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "before = blas()\n"
        "TrainingEngine(Manifest.load(sys.argv[1]), 'cpu', session_options(2, training=True), 1e-3)\n"
        "print(before, blas())\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[2]", "[1]"], out.stdout
