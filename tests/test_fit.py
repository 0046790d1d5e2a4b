"""`fit` on real files against real servers: an ImageFolder with bad files of every kind, CSVs, the errors found
before any step, early stopping, publishing the best, resuming after SIGTERM of the fit process, and a server
that restarts mid-fit."""
from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import ViTClient
from client.dataset import DataError, read_dataset
from client.loader import Loader
from proto.images import ImageError, Recipe
from tests.helpers import REPO, TRAINERS, assert_one_error_line, clean_env, ok, run_client, start_server, wait_for

pytestmark = pytest.mark.slow

GREY = {"height": 8, "width": 8, "channels": 1, "mean": [0.5], "std": [0.5]}


def digit(path: Path, label: int, seed: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> Path:
    """A learnable image of class `label`: a bright band at a place of its own, plus noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(size[1], size[0]), dtype=np.uint8)
    rows = slice(label * size[1] // 4, (label + 1) * size[1] // 4)
    pixels[rows] = 230
    image = Image.fromarray(pixels)
    if mode != "L":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def image_folder(root: Path, per_class: int = 10, classes: tuple[str, ...] = ("0", "1", "2")) -> Path:
    for label, name in enumerate(classes):
        for i in range(per_class):
            digit(root / name / f"{i:03d}.png", label, seed=100 * label + i)
    return root


def odd_files(root: Path) -> dict[str, str]:
    """Every kind of file the brief names, in class 0 (decodable ones) and class 1 (the bad ones); the bad ones'
    reasons, by path."""
    deep = np.full((8, 8), 60000, dtype=np.uint16)
    deep[:2] = 65535
    Image.fromarray(deep).save(root / "0" / "deep16.png")
    digit(root / "0" / "cmyk.jpg", 0, 1, mode="CMYK")
    digit(root / "0" / "alpha.png", 0, 2, mode="RGBA")
    digit(root / "0" / "palette.png", 0, 3, mode="P")
    digit(root / "0" / "nested" / "tall.png", 0, 4, size=(5, 23))
    digit(root / "0" / "wide.png", 0, 5, size=(40, 3))
    good = (root / "1" / "000.png").read_bytes()
    (root / "1" / "corrupt.png").write_bytes(good[:-30])
    (root / "1" / "notes.txt").write_text("not an image\n")
    (root / "1" / ".hidden.png").write_bytes(b"ignored: hidden files are not examples")
    return {str(root / "1" / "corrupt.png"): f"cannot be decoded as an image ({len(good) - 30} bytes): "
                                              "image file is truncated",
            str(root / "1" / "notes.txt"): "cannot be decoded as an image (13 bytes): not a format Pillow reads"}


def steps(address: str) -> int:
    with ViTClient(address) as c:
        return c.get_optimizer().step


def batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


# ---------------------------------------------------------------- a whole run

@pytest.mark.parametrize("trainer", TRAINERS)  # its checkpoints, restore and publish are the trainer's
def test_fit_an_image_folder_with_bad_files_then_publish_the_best(running, tmp_path, trainer):
    data = image_folder(tmp_path / "photos", per_class=8)
    bad = odd_files(data)
    out = tmp_path / "out"
    result = ok(run_client("--address", running.address, "fit", str(data), "--epochs", "2", "--batch-size", "8",
                           "--out", str(out), "--lr", "3e-3", "--publish"))
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["epoch", "1"], ["epoch", "2"]], result.stdout
    assert lines[2].startswith(f"fit finished: 2 epoch(s) in {out}, step ")
    assert "2 file(s) skipped (not decodable; --strict makes the first an error):" in lines
    for path, reason in bad.items():
        assert f"  {path}: {reason}" in lines
    metrics = json.loads((out / "fit.json").read_text())
    assert metrics["classes"] == ["0", "1", "2"] and metrics["skipped"] == bad
    train, val = metrics["train_images"], metrics["val_images"]
    assert (train, val) == (25, 7)  # 32 files (the odd ones among them); 20% held out, 6.4 rounded up
    per_epoch = batches(train, 8)
    assert [e["step"] for e in metrics["epochs"]] == [per_epoch, 2 * per_epoch]
    assert metrics["epochs"][0]["images"] < train  # the bad ones of the training split were not sent
    assert all(e["images_per_s"] > 0 and 0 <= e["val_accuracy"] <= 1 for e in metrics["epochs"])
    assert (out / "fit_curve.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((out / "fit-state.json").read_text())
    assert state["finished"] and state["epoch"] == 2 and state["seed"] == 0
    best = metrics["best"]
    with ViTClient(running.address) as c:
        names = {ck.name: ck.step for ck in c.list_checkpoints().checkpoints}
        assert names["fit-best"] == best["step"] and names["fit-last"] == 2 * per_epoch
        info = c.model_info()
        assert info.model_version == 1 and info.versions[-1].step == best["step"]  # the best, published
    assert f"published model version 1 (weights of step {best['step']})" in result.stdout


def test_a_csv_dataset_with_a_separate_validation_folder(running, tmp_path):
    data = image_folder(tmp_path / "images", per_class=6)
    val = image_folder(tmp_path / "val", per_class=2)
    rows = ["path,label"] + [f"images/{label}/{i:03d}.png,{label}" for label in "012" for i in range(6)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with ViTClient(running.address) as c:
        result = c.fit(tmp_path / "train.csv", tmp_path / "out", epochs=1, batch_size=4, val=val, progress=False)
    assert (result.train_images, result.val_images, result.stopped) == (18, 6, "finished")
    assert result.epochs[0]["images"] == 18 and result.step == batches(18, 4)
    assert read_dataset(tmp_path / "train.csv").examples[0].path == data / "0" / "000.png"


# ---------------------------------------------------------------- errors before any step

def test_data_errors_are_found_before_any_step(running, tmp_path):
    good = image_folder(tmp_path / "good", per_class=3)
    zebra = image_folder(tmp_path / "zebra", per_class=3, classes=("0", "zebra"))
    empty = image_folder(tmp_path / "empty", per_class=3)
    (empty / "3").mkdir()
    one = image_folder(tmp_path / "one", per_class=3, classes=("4",))
    (tmp_path / "bad.csv").write_text("path,label\na.png,0\nb.png\n")
    names = ", ".join(str(i) for i in range(10))
    cases = {
        zebra: f"class 'zebra' (folder {zebra / 'zebra'}) is not one of the model's 10 classes: {names}",
        empty: f"{empty / '3'}: the class folder '3' is empty",
        one: f"{one} holds one class ('4'): fitting needs at least two",
        tmp_path / "bad.csv": f"{tmp_path / 'bad.csv'}, line 3: expected path,label, got 'b.png'",
        tmp_path / "nothing": f"{tmp_path / 'nothing'}: no such folder or CSV file",
    }
    with ViTClient(running.address) as c:
        for data, message in cases.items():
            with pytest.raises(DataError) as err:
                c.fit(data, tmp_path / "out", epochs=1, progress=False)
            assert str(err.value) == message
        with pytest.raises(DataError) as err:
            c.fit(good, tmp_path / "out", epochs=1, val_split=0.1, progress=False)
        assert str(err.value).startswith(f"{good}: cannot hold out 0.1 of each class: ")
        assert c.get_optimizer().step == 0
    line = assert_one_error_line(run_client("--address", running.address, "fit", str(zebra), "--out",
                                            str(tmp_path / "cli")), 1)
    assert line == f"error: {cases[zebra]}"
    assert steps(running.address) == 0 and not (tmp_path / "cli" / "fit-state.json").exists()


def test_strict_makes_the_first_bad_file_an_error(running, tmp_path):
    data = image_folder(tmp_path / "photos", per_class=5)
    (data / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    line = assert_one_error_line(run_client("--address", running.address, "fit", str(data), "--strict", "--val-split",
                                            "0.4", "--out", str(tmp_path / "out"), "--epochs", "1"), 1)
    assert line == f"error: {data / '2' / 'broken.png'}: cannot be decoded as an image (15 bytes): " \
                   "not a format Pillow reads"


def test_early_stopping_keeps_the_best_and_an_unfinished_fit_is_not_overwritten(running, tmp_path):
    data = image_folder(tmp_path / "photos", per_class=5)
    with ViTClient(running.address) as c:
        result = c.fit(data, tmp_path / "out", epochs=6, batch_size=6, lr=0.0, patience=2, progress=False)
        assert result.stopped == "early stopping: no better validation accuracy for 2 epochs"
        assert len(result.epochs) == 3 and result.best["epoch"] == 1
        state = tmp_path / "out" / "fit-state.json"
        document = json.loads(state.read_text())
        state.write_text(json.dumps({**document, "finished": False}))
        with pytest.raises(ValueError) as err:
            c.fit(data, tmp_path / "out", epochs=1, progress=False)
        assert str(err.value) == (f"{tmp_path / 'out'} holds an unfinished fit (fit-state.json): add --resume to "
                                  "continue it, or choose another output folder")


# ---------------------------------------------------------------- the loader

def test_augmentation_is_seeded_and_skips_are_recorded_once(tmp_path):
    data = image_folder(tmp_path / "photos", per_class=4)
    paths = [e.path for e in read_dataset(data).examples] + [tmp_path / "missing.png"]
    labels = np.zeros(len(paths), np.int64)

    def epoch(seed: int, number: int, augment: bool = True) -> tuple[np.ndarray, dict]:
        skipped: dict = {}
        with Loader(paths, labels, Recipe.of(GREY), 5, augment=augment, seed=seed, skipped=skipped) as loader:
            got = list(loader.batches(epoch=number))
        return np.concatenate([b.images for b in got]), skipped

    first, skipped = epoch(0, 0)
    assert first.shape == (12, 1, 8, 8)
    assert skipped == {tmp_path / "missing.png": "cannot be read: No such file or directory"}
    np.testing.assert_array_equal(first, epoch(0, 0)[0])
    assert not np.array_equal(first, epoch(0, 1)[0]) and not np.array_equal(first, epoch(1, 0)[0])
    assert not np.array_equal(first, epoch(0, 0, augment=False)[0])
    with Loader(paths, labels, Recipe.of(GREY), 5, strict=True) as loader:
        with pytest.raises(ImageError):
            list(loader.batches())


def test_a_pass_decodes_ahead_from_its_creation_and_later_passes_gather_the_kept_images(tmp_path):
    """fit creates an epoch's pass before the checkpoint that precedes the epoch, counting on its first batches
    being decoded meanwhile; the second pass must give the same batches, bad file left out, decoding nothing."""
    data = image_folder(tmp_path / "photos", per_class=10)
    paths = [e.path for e in read_dataset(data).examples]
    paths.insert(7, tmp_path / "missing.png")
    labels = np.arange(len(paths), dtype=np.int64)
    order = np.random.default_rng(3).permutation(len(paths))
    with Loader(paths, labels, Recipe.of(GREY), 4, prefetch=3) as loader:
        decoded: list[int] = []
        decode = loader._decode

        def counted(i: int, epoch: int) -> np.ndarray:
            decoded.append(i)
            return decode(i, epoch)

        loader._decode = counted
        first_pass = loader.batches(order, start=1)
        wait_for(lambda: len(decoded) == 3 * 4, 30, "the first three batches decoded before any was asked for")
        assert sorted(decoded) == sorted(order[4:16].tolist())
        first = list(first_pass)
        decoded.clear()
        second = list(loader.batches(order, start=1, epoch=1))
        assert decoded == []  # every image kept: the pass gathers them
    assert [b.number for b in first] == [b.number for b in second] == list(range(1, 8))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.paths == b.paths and a.images.dtype == np.float32 and a.images.flags.c_contiguous
    assert 7 not in np.concatenate([b.labels for b in first])  # the missing file, in one of the batches, left out
    assert sum(len(b.labels) for b in first) == len(paths) - 4 - 1
    assert [p for b in first for p in b.paths] == [paths[i] for i in order[4:] if i != 7]


# ---------------------------------------------------------------- signals and restarts

def fit_process(address: str, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "client", "--address", address, "fit", str(data), "--out",
                             str(out), "--batch-size", "2", "--epochs", "2", *extra], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_a_checkpoint_and_prints_the_command_that_resumes(running, tmp_path):
    data = image_folder(tmp_path / "photos", per_class=20)
    out = tmp_path / "out"
    proc = fit_process(running.address, data, out)
    wait_for(lambda: steps(running.address) >= 3, 60, "fit's third step")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("fit interrupted by SIGTERM: 0 epoch(s)"), stdout
    command = [line for line in lines if line.startswith("resume with: ")]
    expected = [sys.executable, "-m", "client", "--address", running.address, "fit", str(data), "--out", str(out),
                "--batch-size", "2", "--epochs", "2", "--resume"]
    assert command == [f"resume with: {shlex.join(expected)}"]
    state = json.loads((out / "fit-state.json").read_text())
    with ViTClient(running.address) as c:
        saved = {ck.name: ck.step for ck in c.list_checkpoints().checkpoints}
    assert state["step"] == saved["fit-last"] == steps(running.address) >= 3 and not state["finished"]
    assert state["batch"] == state["step"]  # one step per batch of the first epoch
    resumed = subprocess.run(expected, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    ok(resumed)
    per_epoch = batches(48, 2)
    metrics = json.loads((out / "fit.json").read_text())
    assert [e["step"] for e in metrics["epochs"]] == [per_epoch, 2 * per_epoch]
    assert metrics["epochs"][0]["images"] == 48  # the epoch's images once each, across the two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_restart_mid_fit_is_waited_for_and_the_fit_goes_on(exported, tmp_path):
    data = image_folder(tmp_path / "photos", per_class=20)
    env = clean_env(VITSERVE_DATA_DIR=str(tmp_path / "server-data"))
    args = ("--artifacts", str(exported[0]), "--host", "127.0.0.1", "--port", str(free_port()))
    server = start_server(*args, env=env)
    outcome: dict = {}

    def run() -> None:
        with ViTClient(server.address) as c:
            try:
                outcome["result"] = c.fit(data, tmp_path / "out", epochs=2, batch_size=2, progress=False)
            except Exception as e:  # the test reports it
                outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: steps(server.address) >= 5, 60, "fit's fifth step")
        server.stop()  # SIGTERM: the server drains and writes its shutdown checkpoint
        server = start_server(*args, env=env)
        thread.join(timeout=180)
    finally:
        server.stop()
    assert not thread.is_alive() and "error" not in outcome, outcome
    result = outcome["result"]
    per_epoch = batches(48, 2)
    assert result.reconnects >= 1 and result.stopped == "finished"
    assert [e["step"] for e in result.epochs] == [per_epoch, 2 * per_epoch]
    assert result.epochs[0]["images"] == 48
