"""The real-data demo, shortened: `python -m examples.demo` fine-tunes the test export on scikit-learn's digits
through its own server process, publishes, and must classify the held-out digits with Predict at >= 90%."""
from __future__ import annotations

import re
import subprocess
import sys

from PIL import Image

from tests.helpers import REPO, clean_env

EPOCHS = 5  # about 20 s of training on 2 CPU cores; the full demo's default is 15
MIN_ACCURACY = 0.90
DEMO_TIMEOUT = 300.0


def test_demo_reaches_accuracy_and_writes_figures(exported, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--artifacts", str(exported[0]), "--data-dir", str(tmp_path / "data"),
         "--epochs", str(EPOCHS), "--out", str(out), "--min-accuracy", str(MIN_ACCURACY), "--no-progress"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=DEMO_TIMEOUT)
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr, report

    match = re.search(r"Predict test accuracy: ([\d.]+)% \((\d+)/360\) with model version (\d+)", result.stdout)
    assert match, report
    accuracy, correct, version = float(match[1]) / 100, int(match[2]), int(match[3])
    assert accuracy >= MIN_ACCURACY, report
    assert correct == round(accuracy * 360)
    assert version == 1, report  # Predict answered with the published training weights, not the export

    epochs = re.findall(r"^epoch +(\d+): .* test acc ([\d.]+)%$", result.stdout, flags=re.MULTILINE)
    assert [int(e) for e, _ in epochs] == list(range(1, EPOCHS + 1)), report

    for name, min_size in (("loss_curve.png", (600, 300)), ("gradient_flow.png", (600, 400))):
        path = out / name
        assert path.is_file(), f"{name} missing\n{report}"
        with Image.open(path) as image:
            assert image.format == "PNG", name
            assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], (name, image.size)
            image.verify()
