"""`evaluate DATA` and `predict DIR --csv` against a real server on real files: the accuracy is Predict's on the
same files, the per-class metrics are scikit-learn's, bad files are skipped and named."""
from __future__ import annotations

import pytest
import csv
import json

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from client import ViTClient
from client.dataset import read_dataset
from tests.helpers import assert_one_error_line, ok, run_client
from tests.test_fit import digit, image_folder

pytestmark = pytest.mark.slow


def predict_files(address: str, paths) -> np.ndarray:
    """Top-1 class index of each file by Predict on the encoded files (the server decodes them), 8 a call."""
    with ViTClient(address) as c:
        return np.array([top[0][0] for i in range(0, len(paths), 8)
                         for top in c.predict(paths[i:i + 8], top_k=1).predictions])


def test_evaluate_equals_predict_on_the_same_files(running, tmp_path):
    data = image_folder(tmp_path / "photos", per_class=7, classes=("0", "1", "2", "3"))
    digit(data / "3" / "wide.png", 3, 9, size=(31, 6))
    (data / "2" / "readme.txt").write_text("hello\n")
    plot = tmp_path / "confusion.png"
    result = ok(run_client("--address", running.address, "--json", "evaluate", str(data), "--top-k", "3", "--plot",
                           str(plot), "--batch-size", "5"))
    report = json.loads(result.stdout)
    examples = [e for e in read_dataset(data).examples if e.path.suffix == ".png"]
    truth = np.array([int(e.label) for e in examples])
    guess = predict_files(running.address, [e.path for e in examples])
    assert report["count"] == len(examples) == 29
    assert report["accuracy"] == float(np.mean(guess == truth))
    assert report["skipped"] == {str(data / "2" / "readme.txt"):
                                 "cannot be decoded as an image (6 bytes): not a format Pillow reads"}
    assert report["top_k"] == 3 and report["accuracy"] <= report["top_k_accuracy"] <= 1
    present = sorted(set(truth) | set(guess))
    precision, recall, f1, support = precision_recall_fscore_support(truth, guess, labels=present, zero_division=0)
    assert [c["name"] for c in report["classes"]] == [str(i) for i in present]
    np.testing.assert_allclose([c["precision"] for c in report["classes"]], precision)
    np.testing.assert_allclose([c["recall"] for c in report["classes"]], recall)
    np.testing.assert_allclose([c["f1"] for c in report["classes"]], f1)
    assert [c["support"] for c in report["classes"]] == support.tolist()
    matrix = np.array(report["confusion"])
    assert matrix.sum() == 29 and np.trace(matrix) == int(np.sum(guess == truth))
    assert report["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"
    text = ok(run_client("--address", running.address, "evaluate", str(data))).stdout.splitlines()
    assert text[:2] == [f"{data}: 29 images, model version 0", f"accuracy        {report['accuracy'] * 100:.2f}%"]


def test_evaluate_refuses_an_unknown_class_and_strict_refuses_a_bad_file(running, tmp_path):
    data = image_folder(tmp_path / "photos", per_class=2, classes=("0", "cat"))
    line = assert_one_error_line(run_client("--address", running.address, "evaluate", str(data)), 1)
    names = ", ".join(str(i) for i in range(10))
    assert line == f"error: class 'cat' (folder {data / 'cat'}) is not one of the model's 10 classes: {names}"
    good = image_folder(tmp_path / "good", per_class=2)
    (good / "1" / "z.png").write_bytes(b"")
    line = assert_one_error_line(run_client("--address", running.address, "evaluate", str(good), "--strict"), 1)
    assert line == f"error: {good / '1' / 'z.png'}: cannot be decoded as an image (0 bytes): not a format Pillow reads"


def test_predict_a_folder_into_a_csv_table(running, tmp_path):
    folder = tmp_path / "inbox"
    files = [digit(folder / "a" / "b" / f"{i}.png", i % 3, i) for i in range(5)] + \
        [digit(folder / f"top{i}.png", 1, 50 + i, size=(20, 9)) for i in range(3)]
    (folder / "a" / "notes.txt").write_text("x")
    out = tmp_path / "table.csv"
    result = ok(run_client("--address", running.address, "predict", str(folder), "--csv", str(out), "--top-k", "2",
                           "--batch-size", "3"))
    assert result.stdout.splitlines()[:2] == [f"classified 8 files (model version 0); wrote {out}",
                                             "1 file(s) skipped (not decodable; --strict makes the first an error):"]
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2"]
    assert sorted(r[0] for r in rows[1:]) == sorted(str(p) for p in files)
    with ViTClient(running.address) as c:
        expected = {str(p): top for p, top in zip(files, c.predict(files, top_k=2).predictions)}
    for path, first, p1, second, p2 in rows[1:]:
        (_, label1, prob1), (_, label2, prob2) = expected[path]
        assert (first, second) == (label1, label2)
        assert abs(float(p1) - prob1) < 1e-5 and abs(float(p2) - prob2) < 1e-5 and float(p1) >= float(p2)
