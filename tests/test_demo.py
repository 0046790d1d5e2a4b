"""The journey of `make demo`, shortened: scikit-learn's digits as an ImageFolder, a Hugging Face ViT saved with
save_pretrained, exported with --pretrained --num-classes --labels-from, then `vitserve fit`, `evaluate` and
`predict --csv` against the demo's own server process."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import REPO, clean_env

pytestmark = pytest.mark.e2e

EPOCHS = 6  # the full demo's default is 15
MIN_ACCURACY = 0.85
DEMO_TIMEOUT = 600.0


def test_the_demo_goes_from_a_checkpoint_and_a_folder_to_a_served_model(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--out", str(out), "--epochs", str(EPOCHS),
         "--min-accuracy", str(MIN_ACCURACY), "--no-progress"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=DEMO_TIMEOUT)
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr, report

    # The ImageFolder: one folder per digit, 80/20.
    assert sorted(p.name for p in (out / "digits" / "train").iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in (out / "digits" / "test").rglob("*.png")) == 360

    # The export kept the backbone, gave it a new 10-class head named after the folders, and checked itself.
    assert "new (initialised here, not loaded): classifier.weight, classifier.bias" in result.stdout, report
    manifest = json.loads((out / "artifacts" / "digits-hf" / "manifest.json").read_text())
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert set(manifest["export_check"]["trainers"]) == {"ort", "ort-training"}

    # The three commands, as a user types them.
    for command in ("$ vitserve fit ", "$ vitserve evaluate ", "$ vitserve predict "):
        assert command in result.stdout, report
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert [e["epoch"] for e in fit["epochs"]] == list(range(1, EPOCHS + 1)), fit

    match = re.search(r"test accuracy: ([\d.]+)% \((\d+)/360\) with model version (\d+)", result.stdout)
    assert match, report
    accuracy, correct, version = float(match[1]) / 100, int(match[2]), int(match[3])
    assert accuracy >= MIN_ACCURACY and correct == round(accuracy * 360), report
    assert version == 1, report  # Predict answers with the published best weights, not the export's

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["path", "class", "probability"] and len(rows) == 361
    hits = sum(row[1] == row[0].split("/")[-2] for row in rows[1:])  # the true class is the file's folder
    assert hits == correct  # predict --csv agrees with evaluate, file by file
    for name in ("confusion.png", "fit/fit_curve.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 400, name
            image.verify()
