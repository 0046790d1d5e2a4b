"""Prometheus metrics scraped over HTTP from real servers, and the one-line-per-RPC logs (text and JSON)."""
from __future__ import annotations

import json
import logging
import socket

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from tests.helpers import batch, clean_env, images_msg, metric, run_server_to_exit, scrape, start_server, tensor


def test_metrics_after_real_calls(serve):
    running = serve(metrics_port=0)
    url = f"http://127.0.0.1:{running.plane.metrics.port}/metrics"
    images, labels = batch(8, seed=1)
    stub = running.stub
    for _ in range(2):
        stub.Predict(pb.PredictRequest(images=images_msg(images)))
    with pytest.raises(grpc.RpcError) as err:  # a bad Predict: INVALID_ARGUMENT
        stub.Predict(pb.PredictRequest(images=images_msg(images[:, :, :4])))
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "images: shape must be [batch, 1, 8, 8], got [8, 1, 4, 8]")
    responses = [stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
                 for _ in range(3)]
    last = stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels), accumulate_only=True))
    stub.SetOptimizer(pb.SetOptimizerRequest(learning_rate=2.5e-4))
    stub.Publish(pb.PublishRequest())
    client = tc.InferenceServerClient(running.address)
    inp = tc.InferInput("images", [3, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(images[:3])
    client.infer("digits4", [inp])
    client.close()

    m = scrape(url)
    assert metric(m, "vitserve_requests_total", method="Predict", code="OK") == 2
    assert metric(m, "vitserve_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert metric(m, "vitserve_request_errors_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert ("vitserve_request_errors_total", (("code", "OK"), ("method", "Predict"))) not in m
    assert metric(m, "vitserve_requests_total", method="TrainStep", code="OK") == 4
    assert metric(m, "vitserve_requests_total", method="ModelInfer", code="OK") == 1
    assert metric(m, "vitserve_request_duration_seconds_count", method="Predict") == 3
    assert metric(m, "vitserve_request_duration_seconds_count", method="TrainStep") == 4
    assert metric(m, "vitserve_request_duration_seconds_sum", method="TrainStep") > 0
    # Two Predicts and one ModelInfer reached the batcher (the bad Predict was refused before it).
    assert metric(m, "vitserve_batch_size_count") == 3
    assert metric(m, "vitserve_batch_size_sum") == 8 + 8 + 3
    assert metric(m, "vitserve_batch_size_bucket", le="8.0") == 3
    assert metric(m, "vitserve_batch_size_bucket", le="2.0") == 0
    assert metric(m, "vitserve_batcher_queue_depth") == 0
    assert metric(m, "vitserve_train_queue_depth") == 0
    assert metric(m, "vitserve_train_steps_total", outcome="applied") == 3
    assert metric(m, "vitserve_train_steps_total", outcome="accumulated") == 1
    assert metric(m, "vitserve_train_step") == 3
    assert metric(m, "vitserve_train_loss") == pytest.approx(last.loss, rel=1e-6)  # the accumulate-only call
    assert metric(m, "vitserve_grad_norm") == pytest.approx(last.grad_norm, rel=1e-6)
    assert responses[-1].step == 3
    assert metric(m, "vitserve_learning_rate") == pytest.approx(2.5e-4)
    assert metric(m, "vitserve_model_version") == 1


def test_last_loss_and_grad_norm_are_the_last_steps(serve):
    running = serve(metrics_port=0)
    url = f"http://127.0.0.1:{running.plane.metrics.port}/metrics"
    for seed in range(3):
        images, labels = batch(8, seed=seed)
        r = running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
        m = scrape(url)
        assert metric(m, "vitserve_train_loss") == pytest.approx(r.loss, rel=1e-6)
        assert metric(m, "vitserve_grad_norm") == pytest.approx(r.grad_norm, rel=1e-6)
        assert metric(m, "vitserve_train_step") == r.step == seed + 1


def test_refused_calls_are_counted(serve):
    running = serve(metrics_port=0, read_token="read-secret", write_token="write-secret")
    with pytest.raises(grpc.RpcError) as e:
        running.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    m = scrape(f"http://127.0.0.1:{running.plane.metrics.port}/metrics")
    assert metric(m, "vitserve_requests_total", method="GetModelInfo", code="UNAUTHENTICATED") == 1


def test_metrics_off(serve):
    running = serve(metrics_port=-1)
    assert running.plane.metrics.port is None


@pytest.fixture
def artifacts(exported):
    return str(exported[0])


def test_metrics_of_a_server_process_and_json_logs(artifacts):
    """`python -m server --log-json`: the metrics URL is printed and serves; every stderr line is JSON, one per RPC."""
    server = start_server("--artifacts", artifacts, "--port", "0", "--log-json")
    try:
        assert server.metrics_url.startswith("http://127.0.0.1:") and server.metrics_url.endswith("/metrics")
        with grpc.insecure_channel(server.address) as channel:
            stub = vitserve_pb2_grpc.VitServeStub(channel)
            images, _ = batch(2)
            _, call = stub.Predict.with_call(pb.PredictRequest(images=images_msg(images)),
                                             metadata=(("x-request-id", "trace-42"),), timeout=30)
            assert dict(call.initial_metadata())["x-request-id"] == "trace-42"
            _, call = stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), timeout=30)
            generated = dict(call.initial_metadata())["x-request-id"]
            assert len(generated) == 16
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(pb.PredictRequest(images=images_msg(images[:, :, :4])), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        m = scrape(server.metrics_url)
        assert metric(m, "vitserve_requests_total", method="Predict", code="OK") == 1
        assert metric(m, "vitserve_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
        log_text = server.stderr()  # each record is flushed as it is written
    finally:
        server.stop()
    lines = [json.loads(line) for line in log_text.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    rpcs = [line for line in lines if line["logger"] == "vitserve.rpc"]
    assert [(r["method"], r["code"]) for r in rpcs] == [
        ("Predict", "OK"), ("GetModelInfo", "OK"), ("Predict", "INVALID_ARGUMENT")]
    first, info, bad = rpcs
    assert first["request_id"] == "trace-42" and first["service"] == "vitserve.v1.VitServe"
    assert info["request_id"] == generated
    assert all(isinstance(r["duration_ms"], float) and r["duration_ms"] > 0 for r in rpcs)
    assert bad["level"] == "WARNING" and bad["message"] == "rpc Predict INVALID_ARGUMENT"
    assert bad["error"] == "images: shape must be [batch, 1, 8, 8], got [2, 1, 4, 8]"
    assert "error" not in first


def test_taken_metrics_port_is_a_clear_startup_error(artifacts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server_to_exit("--artifacts", artifacts, "--port", "0", "--metrics-port", str(port),
                                    env=clean_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.splitlines()[-1]  # after the model loaded: the port is only bound once it did
    assert line.startswith(f"error: cannot serve metrics on 127.0.0.1:{port}: ")
    assert line.endswith("(choose another --metrics-port, or -1 for none)")


def test_one_text_log_line_per_rpc(running, caplog):
    caplog.set_level(logging.INFO, logger="vitserve.rpc")
    images, labels = batch(4)
    running.stub.Predict(pb.PredictRequest(images=images_msg(images)))
    running.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    with pytest.raises(grpc.RpcError) as err:
        running.stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    records = [r for r in caplog.records if r.name == "vitserve.rpc"]
    assert [(r.fields["method"], r.fields["code"], r.levelname) for r in records] == [
        ("Predict", "OK", "INFO"), ("TrainStep", "OK", "INFO"), ("RestoreCheckpoint", "NOT_FOUND", "WARNING")]
    text = records[0].getMessage()
    assert text.startswith("rpc method=Predict service=vitserve.v1.VitServe code=OK duration_ms=")
    assert f"request_id={records[0].fields['request_id']}" in text
    assert records[2].fields["error"] == "no checkpoint named 'missing' (ListCheckpoints shows the saved ones)"
    assert f"error={records[2].fields['error']!r}" in records[2].getMessage()
    assert np.isfinite(records[1].fields["duration_ms"])
