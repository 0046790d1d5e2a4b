"""Shared fixtures: a small exported model (with its PyTorch twin), the layouts of tests/layout_models.py exported
once per session, and real gRPC servers on 127.0.0.1.

Plain helpers (the model's CONFIG, batch(), tensor(), images_msg(), RunningServer, process helpers) live in
tests/helpers.py; this file holds only fixtures and the hypothesis profile.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import settings as hypothesis_settings

from model import export as exporter
from model.vit import build
from proto import vitserve_pb2_grpc
from server.app import create_server
from server.config import Settings
from server.dataplane import DataPlane
from tests.helpers import CONFIG, LEARNING_RATE, MODEL, RunningServer
from tests.layout_models import LAYOUTS, SmallResNet
from tests.layout_models import export as export_layout

# CI replays the same examples every run (a submission's result must not depend on luck); local runs
# explore new ones. `make fuzz` is the open-ended search.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    """(artifact folder, the PyTorch state_dict it was exported from)."""
    torch.manual_seed(0)
    model = build(CONFIG)
    state = copy.deepcopy(model.state_dict())
    folder = exporter.export(
        model=model, name=MODEL, out=tmp_path_factory.mktemp("artifacts"), image_size=CONFIG.image_size,
        channels=CONFIG.channels, mean=CONFIG.mean, std=CONFIG.std, class_names=[str(i) for i in range(10)],
        source={"preset": "digits", "config": CONFIG.model_kwargs()}, freeze=[], optimizer="adamw", opset=16)
    return folder, state


@pytest.fixture(scope="session")
def frozen_digits(tmp_path_factory) -> Path:
    """The digits preset exported with its patch embedding, position embedding and first block frozen, once per
    session (test_lifecycle serves it, test_explain explains it)."""
    out = tmp_path_factory.mktemp("frozen")
    assert exporter.main(["--preset", "digits", "--out", str(out), "--name", "frozen",
                          "--freeze", "to_patch_embedding.*", "pos_embedding", "transformer.layers.0.*"]) == 0
    return out / "frozen"


@pytest.fixture(scope="session")
def layout_exports(tmp_path_factory):
    """layout_exports(name) -> (artifact folder, the state_dict it was exported from) of tests/layout_models.py's
    layout `name` (or "cnn", its SmallResNet), built under seed 0 and exported on first use; the files that test
    layouts (test_layouts, test_client_gradients) share them instead of exporting each their own (~12 s each)."""
    done: dict[str, tuple[Path, dict]] = {}

    def export(name: str) -> tuple[Path, dict]:
        if name not in done:
            torch.manual_seed(0)
            model = SmallResNet() if name == "cnn" else LAYOUTS[name][0]()
            state = copy.deepcopy(model.state_dict())
            done[name] = (export_layout(model, name, tmp_path_factory.mktemp(f"layout-{name}")), state)
        return done[name]

    return export


@pytest.fixture
def torch_model(exported) -> torch.nn.Module:
    """A fresh PyTorch ViT holding the exported weights."""
    model = build(CONFIG)
    model.load_state_dict(exported[1])
    return model


@pytest.fixture
def trainer() -> str:
    """The trainer the `serve` fixture's servers use: the default. A test file where the behaviour is the trainer's
    overrides this fixture with one whose params are helpers.TRAINERS, so that its tests run on both."""
    return "ort"


@pytest.fixture
def serve(exported, tmp_path, trainer):
    """serve(artifacts=None, data_dir=None, **settings) -> RunningServer; all are stopped after the test."""
    started = []

    def start(artifacts: Path | None = None, data_dir: Path | None = None, **overrides) -> RunningServer:
        overrides = {"learning_rate": LEARNING_RATE, "max_batch_size": 32, "metrics_port": -1, "trainer": trainer,
                     **overrides}
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
