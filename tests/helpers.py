"""Helpers shared by the test files (no fixtures: those live in conftest.py, which imports what it needs from here).

The test model (CONFIG and the numbers derived from it), request builders (batch, tensor, images_msg), the
in-process server handle that conftest's `serve` fixture returns (RunningServer), real `python -m server` and
`python -m client` processes (clean_env, start_server, run_client, run_server_to_exit, ok,
assert_one_error_line) and their text output (assert_printed, text_rows), input files (write_png,
write_npz), Prometheus scraping (scrape, metric) and waiting on a condition (wait_for).
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model.vit import PRESETS
from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from proto.tensors import tensor_to_proto
from server.dataplane import DataPlane
from server.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the test model

# 4 blocks (parity must hold beyond toy depth), small enough to export in about a second.
CONFIG = replace(PRESETS["digits"], depth=4)
LEARNING_RATE = 1e-3
MODEL = "digits4"  # the name conftest's `exported` fixture gives it
NUM_BLOCKS, NUM_HEADS, NUM_PARAMS = 4, 4, 52  # that model: 4 blocks, 4 heads, 52 parameter tensors


TRAINERS = ("ort", "ort-training")  # a test file where the behaviour is the trainer's overrides conftest's
# `trainer` fixture with @pytest.fixture(params=TRAINERS): each of its tests then runs on both


def batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [n, C, H, W] of the test model, labels int64 [n]), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, CONFIG.channels, CONFIG.image_size, CONFIG.image_size), dtype=np.float32)
    return images, rng.integers(0, CONFIG.num_classes, size=n, dtype=np.int64)


def tensor(array: np.ndarray) -> pb.Tensor:
    return tensor_to_proto(array)


def images_msg(array: np.ndarray) -> pb.Images:
    return pb.Images(tensor=tensor_to_proto(array))


# ---------------------------------------------------------------- an in-process server (conftest's `serve`)

@dataclass
class RunningServer:
    plane: DataPlane  # the server's own data plane, to read its weights and step counter
    stub: vitserve_pb2_grpc.VitServeStub  # over a real channel to 127.0.0.1
    address: str
    server: grpc.Server
    channel: grpc.Channel

    @property
    def trainer(self) -> Trainer:
        """The server's trainer (its checkpoints, versions and queue)."""
        return self.plane.trainer("a test")

    @property
    def engine(self):
        """The trainer's training engine: its weights and step counter."""
        return self.trainer.engine

    def stop(self) -> None:
        """Stop like SIGTERM does: no new calls, then the final checkpoint (idempotent)."""
        self.channel.close()
        self.server.stop(None).wait()
        self.plane.close()


# ---------------------------------------------------------------- real processes

START_TIMEOUT = 60.0  # seconds for a server to print its "listening" line
STOP_TIMEOUT = 15.0  # seconds for a server to exit after SIGTERM
CALL_TIMEOUT = 60.0  # seconds for one client process
READY = "vitserve listening on "
METRICS = "vitserve metrics on "
HTTP = "vitserve http on "


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any VITSERVE_* variable (so the caller's shell cannot leak in), plus `extra`.

    Each server gets its own empty data directory unless `extra` names one: checkpoints never leak between tests.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["VITSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="vitserve-data-")
    env["VITSERVE_METRICS_PORT"] = "0"  # a free port: parallel servers never collide on the default 8002
    env["VITSERVE_HTTP_PORT"] = "0"  # nor on the HTTP door's default 8000
    env.update(extra)
    return env


class Server:
    """A `python -m server` process that printed its listening line."""

    def __init__(self, proc: subprocess.Popen, address: str, stderr_file) -> None:
        self.proc = proc
        self.address = address
        self.metrics_url = ""  # from the "vitserve metrics on URL" line, when the endpoint is on
        self.http_url = ""  # from the "vitserve http on URL" line, when the HTTP door is on
        self._stderr = stderr_file

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM; the server must exit with status 0 within STOP_TIMEOUT seconds."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"server did not exit within {STOP_TIMEOUT:g}s of SIGTERM; stderr:\n{self.stderr()}")
            assert code == 0, f"server exited with {code} after SIGTERM; stderr:\n{self.stderr()}"
        finally:
            self._stderr.close()


def start_server(*args: str, env: dict[str, str] | None = None, command: list[str] | None = None,
                 cwd: Path = REPO) -> Server:
    """Start `python -m server ARGS` (or `command ARGS`, e.g. an installed vitserve-server) and wait (up to
    START_TIMEOUT) for "vitserve listening on HOST:PORT"."""
    stderr_file = tempfile.TemporaryFile()  # a file, not a pipe: the server's logs can never block it
    command = command or [sys.executable, "-m", "server"]
    proc = subprocess.Popen([*command, *args], cwd=cwd, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=stderr_file, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # stdout lines -> queue; None at EOF (the process died or closed stdout)
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    server = Server(proc, "", stderr_file)
    deadline = time.monotonic() + START_TIMEOUT
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            proc.kill()
            proc.wait()
            pytest.fail(f"server printed no '{READY}' line within {START_TIMEOUT:g}s; stdout: {seen}; "
                        f"stderr:\n{server.stderr()}")
        if line is None:
            code = proc.wait()
            pytest.fail(f"server exited with {code} before listening; stdout: {seen}; stderr:\n{server.stderr()}")
        seen.append(line)
        if line.startswith(METRICS):
            server.metrics_url = line[len(METRICS):].strip()
        if line.startswith(HTTP):
            server.http_url = line[len(HTTP):].strip()
        if line.startswith(READY):
            server.address = line[len(READY):].strip()
            return server


def run_client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m client ARGS` to completion (output captured as text)."""
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=CALL_TIMEOUT)


def run_server_to_exit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m server ARGS` for a configuration that must not start: it has to exit on its own."""
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=START_TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a client run exited 0 (showing its output otherwise) and return it."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The process exited with `code` and wrote exactly one `error: ...` line to stderr (no traceback); returns it."""
    assert result.returncode == code, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def assert_printed(text: str, value: float, noise: float = 1e-4) -> None:
    """`text` is `value` printed (any of %.4f, %.3e, %.4g, ...): within half a unit of its last digit, plus
    `noise` relative (ORT's threaded reductions may sum in another order from one run to the next)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    half_unit = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    assert abs(float(text) - value) <= half_unit + noise * abs(value), (text, value)


def text_rows(out: str) -> dict[str, str]:
    """The `key            value` rows the CLI prints for info and optimizer (keys padded to 15 columns)."""
    return {line[:15].rstrip(): line[16:] for line in out.splitlines()}


# ---------------------------------------------------------------- input files

def write_png(path: Path, seed: int) -> Path:
    """An 8x8 grayscale PNG with random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    with Image.open(path) as check:
        assert (check.mode, check.size) == ("L", (8, 8))
    return path


def write_npz(path: Path, n: int = 8, seed: int = 0, labels: np.ndarray | None = None) -> Path:
    """An .npz with `images` float32 [n, 1, 8, 8] and `labels` int64 [n]."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 1, 8, 8), dtype=np.float32)
    if labels is None:
        labels = rng.integers(0, 10, size=n, dtype=np.int64)
    np.savez(path, images=images, labels=np.asarray(labels, dtype=np.int64))
    return path


# ---------------------------------------------------------------- metrics and waiting

def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a real HTTP GET of a Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(metrics: dict, name: str, **labels) -> float:
    """One sample of a scrape(): metric(m, "vitserve_requests_total", method="Predict", code="OK")."""
    return metrics[(name, tuple(sorted(labels.items())))]


def wait_for(condition: Callable[[], bool], seconds: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` (every 10 ms) until it holds; fail after `seconds`. For state with no event to wait on."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {seconds:g}s"
        time.sleep(0.01)
