"""The command lines, as users run them: `python -m server` and `python -m client` as real processes on 127.0.0.1."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import (
    CALL_TIMEOUT,
    NUM_BLOCKS,
    NUM_HEADS,
    NUM_PARAMS,
    READY,
    REPO,
    assert_one_error_line,
    assert_printed,
    clean_env,
    ok,
    run_client,
    run_server_to_exit,
    start_server,
    text_rows,
    write_npz,
    write_png,
)

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- the server under test

@pytest.fixture(scope="module")
def address(exported) -> str:
    """HOST:PORT of one `python -m server` process shared by this module's client tests."""
    server = start_server("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", "0")
    host, _, port = server.address.rpartition(":")
    assert host == "127.0.0.1" and port.isdigit() and int(port) > 0, server.address
    yield server.address
    server.stop()


# ---------------------------------------------------------------- info

def test_info_text(address):
    out = ok(run_client("--address", address, "info")).stdout
    assert "digits4" in out
    assert "CPUExecutionProvider" in out
    assert "loss/Div (Div)" in out  # the loss node of the graph the default trainer (ort) runs
    info = json.loads(ok(run_client("--address", address, "--json", "info")).stdout)
    rows = text_rows(out)
    assert list(rows) == ["model", "device", "trainer", "input", "preprocessing", "classes", "parameters", "trainable", "step",
                          "learning rate", "optimizer", "loss node", "opset", "max batch", "model version",
                          "versions", "auto checkpoint", "auto publish"], out
    assert rows["model"] == "digits4"
    assert rows["device"] == "cpu (CPUExecutionProvider)"
    assert rows["trainer"] == f"{info['trainer']} on onnxruntime {ort.__version__}" and info["trainer"] == "ort"
    assert rows["input"] == "images [-1, 1, 8, 8] FLOAT32"
    assert rows["classes"] == "10 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"
    assert rows["parameters"].startswith(f"{NUM_PARAMS} tensors, ") and rows["trainable"] == rows["parameters"]
    assert rows["step"] == str(info["step"])
    assert rows["optimizer"] == "adamw"
    assert rows["loss node"] == f"{info['loss_node']} (Div)"
    assert rows["max batch"] == "256"
    assert rows["model version"] == f"{info['model_version']} (Predict)"


def test_info_json(address):
    info = json.loads(ok(run_client("--address", address, "--json", "info")).stdout)
    assert info["name"] == "digits4"
    assert info["input_shape"] == [-1, 1, 8, 8]
    assert info["execution_providers"] == ["CPUExecutionProvider"]
    assert info["class_names"] == [str(i) for i in range(10)]
    assert len(info["parameters"]) == NUM_PARAMS
    assert info["max_batch_size"] == 256  # the default (test_env_settings shows VITSERVE_MAX_BATCH_SIZE changing it)


# ---------------------------------------------------------------- predict

def test_predict_text_names_both_files(address, tmp_path):
    a, b = write_png(tmp_path / "first.png", 1), write_png(tmp_path / "second.png", 2)
    out = ok(run_client("--address", address, "predict", str(a), str(b))).stdout
    assert str(a) in out and str(b) in out
    assert "%" in out  # the probabilities are printed
    # ... and they are the server's: each file's block lists the same top 5 as --json, in order.
    expected = json.loads(ok(run_client("--address", address, "--json", "predict", str(a), str(b))).stdout)
    lines = out.splitlines()
    assert len(lines) == 2 * (1 + 5) + 1, out
    for i, (path, top) in enumerate(zip((a, b), expected["predictions"])):
        block = lines[6 * i:6 * i + 6]
        assert block[0] == str(path), out
        for line, (_, label, probability) in zip(block[1:], top):
            printed_label, printed = line.split()
            assert printed_label == label and printed.endswith("%"), line
            assert_printed(printed[:-1], probability * 100)
    assert lines[-1] == f"(model version {expected['model_version']})"


def test_predict_json(address, tmp_path):
    a, b = write_png(tmp_path / "first.png", 1), write_png(tmp_path / "second.png", 2)
    result = json.loads(ok(run_client("--address", address, "--json", "predict", str(a), str(b))).stdout)
    predictions = result["predictions"]
    assert len(predictions) == 2
    for top in predictions:
        assert len(top) == 5
        indices = [index for index, _, _ in top]
        probs = [prob for _, _, prob in top]
        assert len(set(indices)) == 5 and all(0 <= i < 10 for i in indices), top
        assert all(label == str(index) for index, label, _ in top), top
        assert all(0 < p <= 1 for p in probs), probs
        assert probs == sorted(probs, reverse=True), probs
        assert sum(probs) <= 1 + 1e-6, probs
    assert result["logits"] is None  # not asked for


# ---------------------------------------------------------------- train-step

def test_train_step_npz_json_repeat(address, tmp_path, exported):
    npz = write_npz(tmp_path / "batch.npz")
    steps = json.loads(ok(run_client("--address", address, "--json", "train-step", "--npz", str(npz),
                                     "--repeat", "2")).stdout)
    assert isinstance(steps, list) and len(steps) == 2
    assert steps[0]["step"] >= 1
    assert steps[1]["step"] == steps[0]["step"] + 1
    expected_names = sorted(exported[1])  # the PyTorch state_dict the artifacts came from
    assert len(expected_names) == NUM_PARAMS
    for s in steps:
        assert math.isfinite(s["loss"]) and s["loss"] > 0, s["loss"]
        assert math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0, s["grad_norm"]
        assert sorted(g["name"] for g in s["gradients"]) == expected_names
        assert len(s["attention"]) == NUM_BLOCKS
        assert [a["block"] for a in s["attention"]] == list(range(NUM_BLOCKS))
        for a in s["attention"]:
            assert a["heads"] == NUM_HEADS
            for part in ("q_head_norms", "k_head_norms", "v_head_norms"):
                assert len(a[part]) == NUM_HEADS, (part, a)


STEP_LINE = re.compile(r"step (\d+)  loss (\S+)  lr (\S+)  grad-norm (\S+)  \((\S+) ms\)  (.+)")
BLOCK_LINE = re.compile(r"  block (\d+)  q \|\|g\|\| (\S+)  k \|\|g\|\| (\S+)  v \|\|g\|\| (\S+)  \((\d+) heads x (\d+)\)")


def text_step_and_json_step(address: str, checkpoint: str, *batch_args: str) -> tuple[str, dict, int]:
    """(text of `train-step BATCH`, the JSON of the same step, the step before it).

    The text step runs first; a checkpoint taken before it is then restored, so the --json run takes the very
    same step (same weights, optimizer state, step counter and batch) and its numbers are the ones to print.
    """
    before = json.loads(ok(run_client("--address", address, "--json", "info")).stdout)["step"]
    ok(run_client("--address", address, "checkpoint", "save", checkpoint))
    out = ok(run_client("--address", address, "train-step", *batch_args)).stdout
    assert json.loads(ok(run_client("--address", address, "--json", "info")).stdout)["step"] == before + 1
    ok(run_client("--address", address, "checkpoint", "restore", checkpoint))
    step = json.loads(ok(run_client("--address", address, "--json", "train-step", *batch_args)).stdout)
    return out, step, before


def assert_text_is_the_step(out: str, step: dict, before: int) -> None:
    """The step line, the gradient table (top 10 by L2 norm) and the attention q/k/v rows print `step`."""
    lines = out.splitlines()
    match = STEP_LINE.fullmatch(lines[0])
    assert match, lines[0]
    number, loss, lr, grad_norm, _, status = match.groups()
    assert int(number) == step["step"] == before + 1
    assert_printed(loss, step["loss"], noise=1e-6)
    assert lr == f"{step['learning_rate']:.3g}"
    assert_printed(grad_norm, step["grad_norm"], noise=1e-5)
    assert status == "applied" and step["applied"] is True

    gradients = {g["name"]: g for g in step["gradients"]}
    assert len(gradients) == NUM_PARAMS
    assert lines[1:3] == ["", f"top 10 of {NUM_PARAMS} parameters by gradient L2 norm"], out
    assert lines[3].split() == ["parameter", "shape", "grad", "L2", "max|g|", "zero", "%", "update", "ratio"]
    rows = [line.split() for line in lines[4:14]]
    shown = []
    for name, shape, l2, max_abs, zero_percent, update_ratio in rows:
        g = gradients[name]
        assert shape == "x".join(map(str, g["shape"])), (name, shape)
        assert_printed(l2, g["l2_norm"])
        assert_printed(max_abs, g["max_abs"])
        assert_printed(zero_percent, g["zero_fraction"] * 100)
        assert_printed(update_ratio, g["update_ratio"])
        shown.append(g["l2_norm"])
    assert shown == sorted(shown, reverse=True) and len(set(name for name, *_ in rows)) == 10, rows
    hidden = [g["l2_norm"] for name, g in gradients.items() if name not in {r[0] for r in rows}]
    assert max(hidden) <= min(shown) * (1 + 1e-4), "a larger gradient is missing from the table"

    assert lines[14:16] == ["", "attention q/k/v gradients"], out
    attention = lines[16:]
    assert len(attention) == 4 * NUM_BLOCKS == 4 * len(step["attention"]), out
    for i, a in enumerate(step["attention"]):
        block = BLOCK_LINE.fullmatch(attention[4 * i])
        assert block, attention[4 * i]
        assert int(block[1]) == a["block"] == i
        for printed, value in zip(block.groups()[1:4], (a["q_norm"], a["k_norm"], a["v_norm"])):
            assert_printed(printed, value)
        assert (int(block[5]), int(block[6])) == (a["heads"], a["dim_head"]) == (NUM_HEADS, 16)
        for line, part in zip(attention[4 * i + 1:4 * i + 4], "qkv"):
            label, heads, *norms = line.split()
            assert (label, heads) == (part, "heads"), line
            assert len(norms) == NUM_HEADS, line
            for printed, value in zip(norms, a[f"{part}_head_norms"]):
                assert_printed(printed, value)


def test_train_step_npz_text(address, tmp_path):
    npz = write_npz(tmp_path / "batch.npz", seed=1)
    out, step, before = text_step_and_json_step(address, "before-npz-text", "--npz", str(npz))
    assert "loss" in out
    assert "block 0" in out
    assert f"block {NUM_BLOCKS - 1}" in out
    assert_text_is_the_step(out, step, before)


def test_train_step_image_files(address, tmp_path):
    a, b = write_png(tmp_path / "a.png", 3), write_png(tmp_path / "b.png", 4)
    out, step, before = text_step_and_json_step(address, "before-png-text", "--images", str(a), str(b),
                                                "--labels", "3", "7")
    assert "loss" in out
    assert_text_is_the_step(out, step, before)


# ---------------------------------------------------------------- errors

def test_label_out_of_range_is_one_error_line(address, tmp_path):
    npz = write_npz(tmp_path / "bad.npz", n=4, labels=np.array([1, 12, 3, 4]))
    line = assert_one_error_line(run_client("--address", address, "train-step", "--npz", str(npz)), code=1)
    assert line.startswith("error: INVALID_ARGUMENT"), line
    assert "labels: must be in [0, 10), got 12" in line, line


UNREACHABLE = "error: UNAVAILABLE: cannot reach the server at 127.0.0.1:1 ("  # then gRPC's own reason


def test_unreachable_server(tmp_path):
    result = run_client("--address", "127.0.0.1:1", "--timeout", "2", "info")
    line = assert_one_error_line(result, code=1)
    assert "127.0.0.1:1" in line, line
    assert line.startswith(UNREACHABLE), line


def test_address_from_environment(address):
    info = json.loads(ok(run_client("--json", "info", env=clean_env(VITSERVE_ADDRESS=address))).stdout)
    assert info["name"] == "digits4"
    # ... and it is that variable that chose the server: pointed elsewhere, the same command fails there.
    result = run_client("--timeout", "2", "info", env=clean_env(VITSERVE_ADDRESS="127.0.0.1:1"))
    assert "127.0.0.1:1" in assert_one_error_line(result, code=1)
    assert assert_one_error_line(result, code=1).startswith(UNREACHABLE)


# ---------------------------------------------------------------- server start-up

@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this ONNX Runtime has CUDA, so --device cuda is not a configuration error here")
def test_server_cuda_without_cuda_build(exported):
    result = run_server_to_exit("--artifacts", str(exported[0]), "--port", "0", "--device", "cuda")
    line = assert_one_error_line(result, code=2)
    assert "CUDA" in line and "--device cpu" in line, line
    assert READY not in result.stdout


def test_server_unknown_device(exported):
    result = run_server_to_exit("--artifacts", str(exported[0]), "--port", "0", "--device", "tpu")
    line = assert_one_error_line(result, code=2)
    assert "tpu" in line, line
    assert READY not in result.stdout


def test_server_device_with_an_index_only_for_cuda(exported):
    result = run_server_to_exit("--artifacts", str(exported[0]), "--port", "0", "--device", "openvino:1")
    assert assert_one_error_line(result, code=2) == (
        "error: device must be 'cpu', 'cuda', 'cuda:N' or 'openvino', got 'openvino:1'")


@pytest.mark.parametrize("flag", ["--device", "--training-device"])
def test_server_openvino_without_its_plugin(exported, flag):
    """This environment (.venv: the training build, ORT 1.19.2) has no OpenVINO plugin; the ort env has it
    (tests/test_trainer_env.py trains on it)."""
    result = run_server_to_exit("--artifacts", str(exported[0]), "--port", "0", flag, "openvino")
    assert assert_one_error_line(result, code=2) == (
        "error: device 'openvino' needs OpenVINO's execution provider plugin: pip install '.[openvino]' "
        "(onnxruntime-ep-openvino; onnxruntime >= 1.23, x86-64)")
    assert READY not in result.stdout


def test_server_missing_artifacts(tmp_path):
    missing = tmp_path / "no-such-export"
    result = run_server_to_exit("--artifacts", str(missing), "--port", "0")
    line = assert_one_error_line(result, code=2)
    assert "make export" in line, line
    assert str(missing) in line, line
    assert READY not in result.stdout


def test_env_settings(exported, tmp_path):
    server = start_server("--artifacts", str(exported[0]), "--host", "127.0.0.1",
                          env=clean_env(VITSERVE_MAX_BATCH_SIZE="3", VITSERVE_PORT="0"))
    try:
        assert int(server.address.rpartition(":")[2]) != 50051  # VITSERVE_PORT=0 picked a free port
        info = json.loads(ok(run_client("--address", server.address, "--json", "info")).stdout)
        assert info["max_batch_size"] == 3

        pngs = [str(write_png(tmp_path / f"{i}.png", i)) for i in range(4)]
        ok(run_client("--address", server.address, "predict", *pngs[:3]))  # at the limit: accepted
        for result in (run_client("--address", server.address, "predict", *pngs),
                       run_client("--address", server.address, "train-step",
                                  "--npz", str(write_npz(tmp_path / "four.npz", n=4)))):
            line = assert_one_error_line(result, code=1)
            assert line.startswith("error: INVALID_ARGUMENT"), line
            assert "over the maximum of 3" in line, line
    finally:
        server.stop()


# ---------------------------------------------------------------- no torch on the serving path

# Imports the serving path (server and client), builds a DataPlane on the exported artifacts and serves one
# Predict and one TrainStep through it. With HIDE_TORCH=1, torch is made unimportable first, as it is in an
# environment installed from a runtime lock (requirements/ort.txt or ort-training.txt) alone. Every attempt to
# import torch is recorded with the file that asked for it; the script prints a JSON report.
SERVING_PATH = """
import json, os, sys, traceback
from pathlib import Path

import numpy as np

attempts = []  # (module asked for, file that asked, stack)

class TorchSpy:
    def find_spec(self, name, path=None, target=None):
        if name != "torch" and not name.startswith("torch."):
            return None
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
        asker = stack[-1].filename if stack else "?"
        if stack and stack[-1].filename.endswith(os.sep + "importlib" + os.sep + "util.py"):
            asker = stack[-2].filename  # importlib.util.find_spec("torch"): the caller is one frame up
        attempts.append((name, asker, "".join(traceback.format_list(stack))))
        if os.environ.get("HIDE_TORCH") == "1":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, TorchSpy())
import engine.no_ortmodule_probe
from server.dataplane import DataPlane
from server.config import Settings
import server.__main__, server.app, client, client.__main__

plane = DataPlane(Settings(artifacts=Path(sys.argv[1])))
images = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
plane.registry.predict("", lambda model: model.decoder.images_from_tensor("FLOAT32", images.shape, images.tobytes()))
loss = plane.trainer("train step").train_step(images, np.array([3, 7], dtype=np.int64)).loss
print(json.dumps({"loss": float(loss), "attempts": attempts,
                  "torch_modules": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def run_serving_path(exported, hide_torch: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", SERVING_PATH, str(exported[0])], cwd=REPO,
                            env=clean_env(HIDE_TORCH="1" if hide_torch else "0"),
                            capture_output=True, text=True, timeout=CALL_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert math.isfinite(report["loss"]) and report["loss"] > 0, report["loss"]
    return report


def is_project_file(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(REPO / package) for package in ("server", "engine", "client", "proto"))


def test_serving_path_needs_no_torch(exported):
    """With torch absent (a requirements/ort.txt or ort-training.txt install), the server and client import, load
    and train, and no server/engine/client/proto module ever asks for torch (only ONNX Runtime's own optional probes
    do)."""
    report = run_serving_path(exported, hide_torch=True)
    from_project = [(name, asker, stack) for name, asker, stack in report["attempts"] if is_project_file(asker)]
    assert not from_project, "project code imports torch:\n" + "\n".join(
        f"{name} asked for by {asker}:\n{stack}" for name, asker, stack in from_project)
    assert report["torch_modules"] == []


def test_serving_path_does_not_import_torch(exported):
    """In this venv, where torch IS installed (for the export), the serving path still never loads it
    (`import onnxruntime` of the training build would, through its ORTModule probe, unless the server stops it)."""
    report = run_serving_path(exported, hide_torch=False)
    first = next((f"{name} asked for by {asker}:\n{stack}" for name, asker, stack in report["attempts"]), "")
    assert "torch" not in report["torch_modules"], f"torch was imported; first request: {first}"


def test_health_command(address):
    result = ok(run_client("--address", address, "health"))
    assert result.stdout.strip() == "SERVING"
    assert json.loads(ok(run_client("--address", address, "--json", "health")).stdout) == {"status": "SERVING"}
    down = run_client("--address", "127.0.0.1:1", "--timeout", "2", "health")
    assert down.returncode == 1 and "127.0.0.1:1" in down.stderr
    assert assert_one_error_line(down, code=1).startswith(UNREACHABLE) and down.stdout == ""
