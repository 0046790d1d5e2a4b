"""Dynamic batching: concurrent Predict calls coalesce, and every caller gets exactly its own rows; the
--[no-]dynamic-batching flag and VITSERVE_DYNAMIC_BATCHING switch it on a real server."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from server.batching import DynamicBatcher
from server.dataplane import DataPlane
from tests.helpers import batch, images_msg, metric, scrape, start_server

pytestmark = pytest.mark.slow


def logits_of(response):
    return np.frombuffer(response.logits.data, dtype="<f4").reshape(response.logits.shape)


def test_concurrent_callers_get_their_own_rows_over_grpc(serve):
    batched = serve(dynamic_batching=True, max_batch_delay_ms=20, max_dynamic_batch=64)
    unbatched = serve(dynamic_batching=False)
    sizes = [1, 3, 1, 2, 5, 1, 4, 1] * 4  # requests of different sizes, 32 callers
    requests = [batch(n, seed=i)[0] for i, n in enumerate(sizes)]

    def call(stub, images):
        return logits_of(stub.Predict(pb.PredictRequest(images=images_msg(images), return_logits=True)))

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda x: call(batched.stub, x), requests))
    expected = [call(unbatched.stub, x) for x in requests]
    for images, a, b in zip(requests, got, expected):
        assert a.shape == (len(images), 10)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    sizes_run = batched.plane.registry.model().batcher.batch_sizes
    assert sum(n * c for n, c in sizes_run.items()) == sum(sizes)  # every row ran exactly once
    assert max(sizes_run) > 5, sizes_run  # and requests really were coalesced


def test_a_request_larger_than_the_batch_limit_runs_alone():
    runs = []

    def run(images):
        runs.append(len(images))
        return 7, images.reshape(len(images), -1)[:, :2] * 2

    batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.05)
    try:
        images = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
        answer = batcher.answer(images)
        version, out = answer.version, answer.logits
        assert version == 7 and runs == [6]
        np.testing.assert_array_equal(out, images[:, :2] * 2)
    finally:
        batcher.close()


def test_an_error_reaches_every_caller_of_the_batch_and_the_batcher_survives():
    calls = threading.Barrier(3)
    runs = []

    def run(images):
        runs.append(len(images))
        if (images < 0).any():
            raise ValueError("bad batch")
        return 1, images

    batcher = DynamicBatcher(run, max_batch=16, max_delay_s=0.2)
    try:
        def submit(x):
            calls.wait()
            return batcher.answer(x)

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(submit, np.full((1, 2), v, np.float32)) for v in (1.0, -1.0, 2.0)]
        errors = [f.exception() for f in futures]
        assert all(isinstance(e, ValueError) for e in errors), errors  # one batch, one failure for all
        assert [str(e) for e in errors] == ["bad batch"] * 3
        assert runs == [3]  # the three requests ran as one batch
        assert batcher.answer(np.ones((1, 2), np.float32)).logits.tolist() == [[1.0, 1.0]]
        assert runs == [3, 1]
    finally:
        batcher.close()


@pytest.mark.parametrize("flag, expected", [("--no-dynamic-batching", False), ("--dynamic-batching", True)])
def test_the_flag_switches_batching(flag, expected, exported):
    """The flag reaches a real `python -m server`: its Predicts go through the batcher (one observation each in
    the vitserve_batch_size histogram) only with --dynamic-batching."""
    from server.__main__ import parse_args

    assert parse_args([flag])["dynamic_batching"] is expected
    server = start_server("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", "0", flag)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = vitserve_pb2_grpc.VitServeStub(channel)
            for n in (3, 2):
                response = stub.Predict(pb.PredictRequest(images=images_msg(batch(n)[0])), timeout=30)
                assert len(response.predictions) == n
        m = scrape(server.metrics_url)
    finally:
        server.stop()
    assert metric(m, "vitserve_requests_total", method="Predict", code="OK") == 2
    assert metric(m, "vitserve_batch_size_count") == (2 if expected else 0)
    assert metric(m, "vitserve_batch_size_sum") == (5 if expected else 0)


def test_environment_switches_batching(exported, tmp_path):
    from server.config import Settings
    from engine.errors import ConfigError

    assert Settings.from_env({"VITSERVE_DYNAMIC_BATCHING": "off"}).dynamic_batching is False
    assert Settings.from_env({"VITSERVE_DYNAMIC_BATCHING": "1"}).dynamic_batching is True
    with pytest.raises(ConfigError, match="VITSERVE_DYNAMIC_BATCHING='maybe' is not a valid bool"):
        Settings.from_env({"VITSERVE_DYNAMIC_BATCHING": "maybe"})
    # ... and a data plane built from those settings batches, or not.
    images = batch(3)[0]
    for raw, batched in (("off", False), ("1", True)):
        settings = Settings.from_env({"VITSERVE_DYNAMIC_BATCHING": raw}, artifacts=exported[0],
                                     data_dir=tmp_path / raw, metrics_port=-1)
        plane = DataPlane(settings)
        try:
            model = plane.registry.model()
            assert (model.batcher is not None) is batched
            assert [len(p) for p in plane.registry.predict("", lambda m: images).predictions] == [5, 5, 5]
            assert plane.metrics.registry.get_sample_value("vitserve_batch_size_count") == (1 if batched else 0)
            if batched:
                assert model.batcher.batch_sizes == {3: 1}
        finally:
            plane.close()
