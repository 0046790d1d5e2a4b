"""Shared fixtures: a small exported model (with its PyTorch twin) and real gRPC servers on 127.0.0.1."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import settings as hypothesis_settings

from client.client import tensor_to_proto
from model import export as exporter
from model.vit import PRESETS, build
from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from server.app import create_server
from server.config import Settings
from server.dataplane import DataPlane

# CI replays the same examples every run (a submission's result must not depend on luck); local runs
# explore new ones. `make fuzz` is the open-ended search.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

# 4 blocks (parity must hold beyond toy depth), small enough to export in about a second.
CONFIG = replace(PRESETS["digits"], depth=4)
LEARNING_RATE = 1e-3


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    """(artifact folder, the PyTorch state_dict it was exported from)."""
    torch.manual_seed(0)
    model = build(CONFIG)
    state = copy.deepcopy(model.state_dict())
    folder = exporter.export(
        model=model, name="digits4", out=tmp_path_factory.mktemp("artifacts"), image_size=CONFIG.image_size,
        channels=CONFIG.channels, mean=CONFIG.mean, std=CONFIG.std, class_names=[str(i) for i in range(10)],
        source={"preset": "digits", "config": CONFIG.model_kwargs()}, freeze=[], optimizer="adamw", opset=16)
    return folder, state


@pytest.fixture
def torch_model(exported) -> torch.nn.Module:
    """A fresh PyTorch ViT holding the exported weights."""
    model = build(CONFIG)
    model.load_state_dict(exported[1])
    return model


@pytest.fixture
def serve(exported, tmp_path):
    """serve(artifacts=None, data_dir=None, **settings) -> RunningServer; all are stopped after the test."""
    started = []

    def start(artifacts: Path | None = None, data_dir: Path | None = None, **overrides) -> RunningServer:
        overrides = {"learning_rate": LEARNING_RATE, "max_batch_size": 32, "metrics_port": -1, **overrides}
        settings = Settings.from_env(environ={}, artifacts=artifacts or exported[0], host="127.0.0.1", port=0,
                                     data_dir=data_dir or tmp_path / "data", **overrides)
        plane = DataPlane(settings)
        server, port = create_server(settings, plane)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        running = RunningServer(plane, vitserve_pb2_grpc.VitServeStub(channel), f"127.0.0.1:{port}", server, channel)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def running(serve):
    """A fresh server (fresh weights, step 0, empty data directory) per test."""
    return serve()


@dataclass
class RunningServer:
    plane: DataPlane  # the server's own data plane, to read its weights and step counter
    stub: vitserve_pb2_grpc.VitServeStub  # over a real channel to 127.0.0.1
    address: str
    server: grpc.Server
    channel: grpc.Channel

    def stop(self) -> None:
        """Stop like SIGTERM does: no new calls, then the final checkpoint (idempotent)."""
        self.channel.close()
        self.server.stop(None).wait()
        self.plane.close()


def batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, CONFIG.channels, CONFIG.image_size, CONFIG.image_size), dtype=np.float32)
    return images, rng.integers(0, CONFIG.num_classes, size=n, dtype=np.int64)


def tensor(array: np.ndarray) -> pb.Tensor:
    return tensor_to_proto(array)


def images_msg(array: np.ndarray) -> pb.Images:
    return pb.Images(tensor=tensor_to_proto(array))
