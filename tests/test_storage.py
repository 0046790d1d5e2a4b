"""Damaged or unusable storage, on real files: checksummed checkpoints with quarantine and fallback, a checked data
directory, write failures (a read-only mount, a full tmpfs), and manifest.json checked field by field."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import ConfigError
from engine.manifest import MANIFEST, Manifest
from proto import vitserve_pb2 as pb
from proto.vitserve_pb2_grpc import VitServeStub
from server.persistence import CHECKPOINT_FOLDERS
from tests.helpers import (
    TRAINERS,
    REPO,
    STOP_TIMEOUT,
    assert_one_error_line,
    batch,
    clean_env,
    images_msg,
    run_server_to_exit,
    start_server,
    tensor,
    wait_for,
)

pytestmark = pytest.mark.slow

CHECKPOINT = "checkpoint"


def step(stub, seed: int = 0) -> pb.TrainStepResponse:
    images, labels = batch(8, seed=seed)
    return stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))


def checkpoints_at(data: Path, trainer: str = "ort") -> Path:
    return data / "digits4" / CHECKPOINT_FOLDERS[trainer]


def quarantined_checkpoints(data: Path, trainer: str) -> list[str]:
    return [p.name for p in (data / "digits4" / "quarantine" / CHECKPOINT_FOLDERS[trainer]).iterdir()]


on_both_trainers = pytest.mark.parametrize("trainer", TRAINERS)  # the checkpoint formats differ


def two_checkpoints(serve, data: Path) -> dict[str, np.ndarray]:
    """Steps 1 and 2 saved as 'one' and 'two'; returns the weights of step 1."""
    server = serve(data_dir=data)
    step(server.stub, 0)
    server.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="one"))
    at_one = server.engine.parameters()
    step(server.stub, 1)
    server.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="two"))
    server.stop()
    return at_one


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # same size, other bytes
    path.write_bytes(bytes(data))


DAMAGE = {  # what is done to checkpoint 'two' -> the problem the WARNING names
    "meta truncated": (lambda d: truncate(d / "meta.json"), "meta.json cannot be read"),
    "meta deleted": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    "file truncated": (lambda d: truncate(d / CHECKPOINT), "checkpoint has"),
    "file emptied": (lambda d: (d / CHECKPOINT).write_bytes(b""), "checkpoint has 0 bytes"),
    "file overwritten in the middle": (lambda d: overwrite_middle(d / CHECKPOINT),
                                       "checkpoint does not match the sha256 written with it"),
    "file deleted": (lambda d: (d / CHECKPOINT).unlink(), "checkpoint is missing"),
}


@on_both_trainers
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_startup_quarantines_a_damaged_checkpoint_and_resumes_from_the_newest_intact_one(serve, tmp_path, damage,
                                                                                         caplog, trainer):
    data = tmp_path / "data"
    at_one = two_checkpoints(serve, data)
    harm, problem = DAMAGE[damage]
    harm(checkpoints_at(data, trainer) / "two")
    with caplog.at_level(logging.WARNING, logger="engine.store.files"):
        server = serve(data_dir=data)
    assert server.engine.step == 1
    weights = server.engine.parameters()
    assert all(np.array_equal(weights[n], at_one[n]) for n in at_one)
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.startswith("checkpoint two is damaged (") and problem in warning and "moved aside to" in warning
    quarantined = quarantined_checkpoints(data, trainer)
    assert len(quarantined) == 1 and quarantined[0].startswith("two-")
    listing = server.stub.ListCheckpoints(pb.ListCheckpointsRequest())
    assert [c.name for c in listing.checkpoints] == ["one"] and listing.latest == "one"


@on_both_trainers
def test_with_no_intact_checkpoint_the_server_starts_from_the_export(serve, tmp_path, trainer):
    data = tmp_path / "data"
    two_checkpoints(serve, data)
    for name in ("one", "two"):
        overwrite_middle(checkpoints_at(data, trainer) / name / CHECKPOINT)
    server = serve(data_dir=data)
    assert server.engine.step == 0
    assert sorted(p.split("-")[0] for p in quarantined_checkpoints(data, trainer)) == \
        ["one", "two"]


@on_both_trainers
def test_restore_of_a_damaged_checkpoint_is_failed_precondition_and_changes_nothing(serve, tmp_path, trainer):
    server = serve()
    step(server.stub, 0)
    server.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="one"))
    step(server.stub, 1)
    before = server.engine.parameters()
    overwrite_middle(server.trainer.checkpoints.store.root / "one" / CHECKPOINT)
    with pytest.raises(grpc.RpcError) as e:
        server.stub.RestoreCheckpoint(pb.RestoreCheckpointRequest(name="one"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == ("checkpoint 'one' is damaged: checkpoint does not match the sha256 written with it "
                                 "(its bytes changed); nothing was restored")
    assert server.engine.step == 2
    after = server.engine.parameters()
    assert all(np.array_equal(before[n], after[n]) for n in before)


@on_both_trainers
def test_list_checkpoints_lists_damaged_entries_as_damaged_and_never_fails(serve, tmp_path, trainer):
    server = serve()
    for seed, name in enumerate(("a", "b", "c")):
        step(server.stub, seed)
        server.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name=name))
    root = server.trainer.checkpoints.store.root
    truncate(root / "c" / CHECKPOINT)
    (root / "b" / "meta.json").write_text("{not json")
    listing = server.stub.ListCheckpoints(pb.ListCheckpointsRequest())
    problems = {c.name: c.problem for c in listing.checkpoints}
    assert problems["a"] == "" and problems["b"].startswith("meta.json cannot be read (")
    assert problems["c"].startswith("checkpoint has ") and problems["c"].endswith(" were written")
    assert listing.latest == "a"  # the newest intact one


def test_a_damaged_published_version_is_quarantined_and_the_previous_one_served(serve, tmp_path):
    data = tmp_path / "data"
    server = serve(data_dir=data)
    step(server.stub, 0)
    assert server.stub.Publish(pb.PublishRequest()).version == 1
    step(server.stub, 1)
    assert server.stub.Publish(pb.PublishRequest()).version == 2
    server.stop()
    overwrite_middle(data / "digits4" / "models" / "v000002" / "inference.onnx")
    again = serve(data_dir=data)
    assert again.plane.registry.model_version == 1
    assert [p.name[:7] for p in (data / "digits4" / "quarantine" / "models").iterdir()] == ["v000002"]
    images, _ = batch(2)
    assert again.stub.Predict(pb.PredictRequest(images=images_msg(images))).model_version == 1


# ---------------------------------------------------------------- the data directory at startup

def test_a_data_dir_below_a_regular_file_is_one_error_line(exported, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_server_to_exit("--artifacts", str(exported[0]), "--port", "0",
                                env=clean_env(VITSERVE_DATA_DIR=str(blocker / "data")))
    line = assert_one_error_line(result, 2)
    assert line == f"error: data directory {blocker}/data/digits4/checkpoints cannot be created: Not a directory"


@contextlib.contextmanager
def mounted(path: Path, options: str):
    """A tmpfs at `path` (root only); skips the test where mounting is not possible here."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_data_dir_is_one_error_line(exported, tmp_path):
    with mounted(tmp_path / "ro", "ro,size=1m") as data:
        result = run_server_to_exit("--artifacts", str(exported[0]), "--port", "0",
                                    env=clean_env(VITSERVE_DATA_DIR=str(data)))
    line = assert_one_error_line(result, 2)
    assert line == f"error: data directory {data}/digits4/checkpoints cannot be created: Read-only file system"


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_a_full_disk_is_resource_exhausted_naming_the_folder_and_the_server_goes_on(serve, tmp_path):
    with mounted(tmp_path / "small", "size=256k") as data:  # smaller than one checkpoint
        server = serve(data_dir=data)
        step(server.stub, 0)
        with pytest.raises(grpc.RpcError) as e:
            server.stub.SaveCheckpoint(pb.SaveCheckpointRequest(name="big"))
        root = data / "digits4" / "checkpoints"
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details().startswith(f"checkpoint 'big' could not be written to {root}: ")
        assert e.value.details().endswith("(the disk is full)")
        assert list(root.iterdir()) == []  # no partial entry
        assert step(server.stub, 1).step == 2  # still serving, still training
        images, _ = batch(2)
        assert len(server.stub.Predict(pb.PredictRequest(images=images_msg(images))).predictions) == 2
        remount(data, "size=64m")  # space again: the final checkpoint holds every acknowledged step
        server.stop()
        assert [c.step for c in server.trainer.checkpoints.store.list()] == [2]


def test_a_data_dir_that_turns_read_only_is_failed_precondition_and_nothing_is_lost(serve, tmp_path):
    with mounted(tmp_path / "disk", "size=64m") as data:
        server = serve(data_dir=data)
        step(server.stub, 0)
        remount(data, "ro")
        for call, request, what, root in (
                (server.stub.SaveCheckpoint, pb.SaveCheckpointRequest(name="x"), "checkpoint 'x'", "checkpoints"),
                (server.stub.Publish, pb.PublishRequest(), "the next model version", "models")):
            with pytest.raises(grpc.RpcError) as e:
                call(request)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert e.value.details().startswith(f"{what} could not be written to {data / 'digits4' / root}: ")
            assert "Read-only file system" in e.value.details()
        assert step(server.stub, 1).step == 2 and server.plane.registry.model_version == 0
        remount(data, "rw")
        server.stop()  # the final checkpoint holds both acknowledged steps
        assert [c.step for c in server.trainer.checkpoints.store.list()] == [2]


def test_with_a_checkpoint_every_step_a_step_that_cannot_be_made_durable_is_rolled_back(serve, tmp_path):
    with mounted(tmp_path / "small", "size=256k") as data:
        server = serve(data_dir=data, checkpoint_every_steps=1)
        before = server.engine.parameters()
        with pytest.raises(grpc.RpcError) as e:
            step(server.stub, 0)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details().endswith("(the disk is full); the step was rolled back (weights, optimizer state "
                                          "and step as before the call)")
        assert server.engine.step == 0
        after = server.engine.parameters()
        assert all(np.array_equal(before[n], after[n]) for n in before)
        remount(data, "size=64m")
        assert step(server.stub, 0).step == 1  # acknowledged: durable
        assert [c.step for c in server.trainer.checkpoints.store.list()] == [1]
        server.stop()


def test_sigterm_when_the_final_checkpoint_cannot_be_written_is_one_error_line_and_exit_3(exported, tmp_path):
    with mounted(tmp_path / "small", "size=256k") as data:
        server = start_server("--artifacts", str(exported[0]), "--port", "0",
                              env=clean_env(VITSERVE_DATA_DIR=str(data)))
        try:
            images, labels = batch(8)
            channel = grpc.insecure_channel(server.address)
            VitServeStub(channel).TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
            channel.close()
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=STOP_TIMEOUT)
            stderr = server.stderr()
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    assert code == 3 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    root = data / "digits4" / "checkpoints"
    assert len(errors) == 1 and errors[0].startswith(
        f"error: the final checkpoint could not be written: checkpoint 'step-00000001' could not be written to {root}")


# ---------------------------------------------------------------- manifest.json, field by field

@pytest.fixture(scope="module")
def manifest_text(exported) -> str:
    return (exported[0] / MANIFEST).read_text()


def copy_artifacts(exported, tmp_path: Path, raw: dict) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(exported[0], folder, dirs_exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(raw))
    return folder


def test_a_manifest_without_a_files_entry_is_one_error_line(exported, tmp_path, manifest_text):
    raw = json.loads(manifest_text)
    del raw["files"]["weights.safetensors"]  # what the default trainer (ort) starts from
    folder = copy_artifacts(exported, tmp_path, raw)
    result = run_server_to_exit("--artifacts", str(folder), "--port", "0", env=clean_env())
    line = assert_one_error_line(result, 2)
    assert line == f"error: {folder}/manifest.json: field files.weights.safetensors is missing: re-run the export"


def paths(raw, prefix=()):
    """Every (path) to a value inside the manifest."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(raw, list):
        for i, v in enumerate(raw[:2]):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutated_manifest_is_one_config_error_naming_the_field(exported, tmp_path_factory, manifest_text, data):
    raw = json.loads(manifest_text)
    required = [p for p in paths(raw) if p[0] not in ("export_check", "export_seconds", "unplaced",
                                                      "frozen_batchnorm", "source", "versions", "optimizer")
                and not (len(p) > 1 and p[0] in ("source", "export_check"))]
    target = data.draw(st.sampled_from(required), label="field")
    mutation = data.draw(st.sampled_from(["delete", "string", "null", "list", "number"]), label="mutation")
    parent = raw
    for key in target[:-1]:
        parent = parent[key]
    original = parent[target[-1]]
    if mutation == "delete" and isinstance(parent, dict):
        del parent[target[-1]]
    else:
        replacement = {"string": "x", "null": None, "list": [], "number": 7, "delete": None}[mutation]
        if type(replacement) is type(original) or (isinstance(original, str) and mutation == "string"):
            replacement = {"x": 3.5}
        parent[target[-1]] = replacement
    folder = tmp_path_factory.mktemp("mutated")
    (folder / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        Manifest.load(folder)
    message = str(e.value)
    assert "\n" not in message and " object at 0x" not in message
    assert str(folder / MANIFEST) in message or "artifact" in message
    named = ".".join(str(p) for p in target)
    assert named.split(".")[0] in message or "artifact" in message, (named, message)


@on_both_trainers
def test_sigkill_right_after_a_quarantine_move_loses_nothing(exported, serve, tmp_path, trainer):
    """Kill -9 a real server process the moment it logs the quarantine; the next start resumes from the same
    intact checkpoint, with the damaged one quarantined exactly once."""
    data = tmp_path / "data"
    at_one = two_checkpoints(serve, data)
    overwrite_middle(checkpoints_at(data, trainer) / "two" / CHECKPOINT)
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--artifacts", str(exported[0]), "--port", "0"],
                                cwd=REPO, env=clean_env(VITSERVE_DATA_DIR=str(data), VITSERVE_TRAINER=trainer),
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for(lambda: "moved aside to" in log.read_text() or proc.poll() is not None, seconds=60,
                     what="the quarantine WARNING")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    assert "checkpoint two is damaged (checkpoint does not match the sha256 written with it" in log.read_text()
    assert "Traceback" not in log.read_text()
    again = serve(data_dir=data)
    assert again.engine.step == 1
    weights = again.engine.parameters()
    assert all(np.array_equal(weights[n], at_one[n]) for n in at_one)
    quarantined = quarantined_checkpoints(data, trainer)
    assert len(quarantined) == 1 and quarantined[0].startswith("two-")
