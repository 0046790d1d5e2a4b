"""Limits: message size, the training queue and client deadlines. A refused call changes nothing."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from proto import vitserve_pb2 as pb
from tests.helpers import batch, images_msg, tensor, wait_for


def train_request(n=4, seed=0) -> pb.TrainStepRequest:
    images, labels = batch(n, seed=seed)
    return pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels), omit_gradient_summaries=True)


def test_a_too_large_message_is_resource_exhausted_and_the_connection_lives(serve):
    running = serve(max_message_mb=1, max_batch_size=100_000)
    huge = np.zeros((5000, 1, 8, 8), np.float32)  # 1.28 MB
    request = pb.TrainStepRequest(images=images_msg(huge), labels=tensor(np.zeros(5000, np.int64)))
    with pytest.raises(grpc.RpcError) as err:
        running.stub.TrainStep(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    assert err.value.details() == f"SERVER: Received message larger than max ({request.ByteSize()} vs. {1 << 20})"
    assert running.engine.step == 0
    assert running.stub.TrainStep(train_request()).step == 1  # same channel, still fine


def test_a_full_training_queue_is_resource_exhausted(serve):
    running = serve(max_queued_train_steps=1)
    lock = running.engine._lock
    lock.acquire()  # a long step is "running"
    results = []
    try:
        waiting = [threading.Thread(target=lambda i=i: results.append(running.stub.TrainStep(train_request(seed=i))))
                   for i in range(2)]
        for t in waiting:
            t.start()
        wait_for(lambda: running.trainer.queued == 2)  # one at the lock's head, one queued: the limit
        with pytest.raises(grpc.RpcError) as err:
            running.stub.TrainStep(train_request(seed=9))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "training queue is full: 1 train steps are waiting (max_queued_train_steps=1)" in err.value.details()
        assert err.value.details() == ("training queue is full: 1 train steps are waiting (max_queued_train_steps=1); "
                                       "retry later")
    finally:
        lock.release()
    for t in waiting:
        t.join()
    assert sorted(r.step for r in results) == [1, 2]  # the queued ones ran; the refused one did not
    assert running.engine.step == 2


def test_a_step_whose_deadline_passed_while_waiting_is_not_applied(serve):
    running = serve()
    before = running.engine.parameters()
    lock = running.engine._lock
    lock.acquire()
    try:
        with pytest.raises(grpc.RpcError) as err:
            running.stub.TrainStep(train_request(), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.2)  # not a synchronization: the server's copy of the deadline must pass too before the release
    finally:
        lock.release()
    wait_for(lambda: running.trainer.queued == 0)
    assert running.engine.step == 0
    after = running.engine.parameters()
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert running.stub.TrainStep(train_request()).step == 1
