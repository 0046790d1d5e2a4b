"""`evaluate DATA` (accuracy, top-k accuracy, per-class precision, recall and F1, a confusion matrix) and
`predict DIR --csv` (a folder classified into a table), both over Predict: they score the model Predict serves
(after `fit`, `publish` it first).

The files are decoded on the client by the server's own decoder (proto/images.py) in worker threads
(client/loader.py) and sent as tensors in batches, so a file that is not an image is skipped and named instead of
failing its whole batch (`strict`: the first one is an error). The metrics are scikit-learn's.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client import PredictResult
from client.dataset import DataError, class_indices, image_files, read_dataset
from client.loader import Batch, Loader
from proto.images import Recipe

if TYPE_CHECKING:
    from client.client import ViTClient


@dataclass
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int  # true images of the class


@dataclass
class Evaluation:
    data: str
    count: int  # images scored
    accuracy: float
    top_k: int
    top_k_accuracy: float
    macro_f1: float
    classes: list[ClassMetrics]  # every class that is a true or a predicted one, in the model's order
    confusion: list[list[int]]  # rows: true class, columns: predicted, in `classes` order
    skipped: dict[str, str] = field(default_factory=dict)
    model_version: int = 0
    plot: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FolderPredictions:
    """predict DIR: one row per classified file (path, then the top-k (class, probability), best first)."""
    rows: list[tuple[str, list[tuple[str, float]]]]
    skipped: dict[str, str] = field(default_factory=dict)
    model_version: int = 0
    csv: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"predictions": [{"path": p, "top": [{"class": c, "probability": q} for c, q in top]}
                                for p, top in self.rows],
                "skipped": self.skipped, "model_version": self.model_version, "csv": self.csv}


def predicted(client: ViTClient, paths: list[Path], labels: np.ndarray, *, batch_size: int, top_k: int,
              logits: bool, workers: int, strict: bool, model: str,
              skipped: dict[Path, str]) -> Iterator[tuple[Batch, PredictResult]]:
    """Predict on every file in batches, decoded ahead in worker threads; each batch with its answer."""
    info = client.model_info(model)
    if batch_size < 1 or batch_size > info.max_batch_size:
        raise ValueError(f"batch size must be in [1, {info.max_batch_size}] (the server's maximum), got {batch_size}")
    with Loader(paths, labels, Recipe.of(info.preprocessing), batch_size, workers=workers, strict=strict,
                cache_mb=0, skipped=skipped) as loader:
        for batch in loader.batches():
            if len(batch.images):
                yield batch, client.predict(batch.images, top_k=top_k, return_logits=logits, model=model)


def evaluate(client: ViTClient, data: str | os.PathLike, *, top_k: int = 5, batch_size: int = 32, workers: int = 2,
             strict: bool = False, plot: str | os.PathLike | None = None, model: str = "") -> Evaluation:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, \
        top_k_accuracy_score

    if top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    info = client.model_info(model)
    names = info.class_names
    dataset = read_dataset(data)
    labels = class_indices(dataset, names)
    skipped: dict[Path, str] = {}
    truth, scores, version = [], [], 0
    for batch, result in predicted(client, [e.path for e in dataset.examples], labels, batch_size=batch_size,
                                   top_k=1, logits=True, workers=workers, strict=strict, model=model,
                                   skipped=skipped):
        truth.append(batch.labels)
        scores.append(result.logits)
        version = result.model_version
    if not truth:
        raise DataError(f"{data}: no file could be decoded ({len(skipped)} skipped)")
    y, score = np.concatenate(truth), np.concatenate(scores)
    guess = score.argmax(axis=1)
    k = min(top_k, len(names))
    top = accuracy_score(y, guess) if k == 1 else 1.0 if k >= len(names) else \
        top_k_accuracy_score(y, score, k=k, labels=np.arange(len(names)))
    present = sorted(set(y.tolist()) | set(guess.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(y, guess, labels=present, zero_division=0)
    matrix = confusion_matrix(y, guess, labels=present)
    shown = [names[i] for i in present]
    picture = None
    if plot is not None:
        from client.plots import confusion_matrix as draw

        picture = str(draw(matrix, shown, plot, f"{data}: accuracy {accuracy_score(y, guess):.1%} of {len(y)} "
                                                f"images (model version {version})"))
    return Evaluation(
        data=str(data), count=len(y), accuracy=float(accuracy_score(y, guess)), top_k=k, top_k_accuracy=float(top),
        macro_f1=float(np.mean([f1[present.index(i)] for i in sorted(set(y.tolist()))])),
        classes=[ClassMetrics(n, float(p), float(r), float(f), int(s))
                 for n, p, r, f, s in zip(shown, precision, recall, f1, support)],
        confusion=matrix.tolist(), skipped={str(p): r for p, r in skipped.items()}, model_version=version,
        plot=picture)


def predict_folder(client: ViTClient, inputs: list[str | os.PathLike], *, top_k: int = 5, batch_size: int = 32,
                   workers: int = 2, strict: bool = False, csv_path: str | os.PathLike | None = None,
                   model: str = "") -> FolderPredictions:
    """Classify files and every file below folders (recursively, sorted); write a CSV table when asked."""
    if top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += image_files(item)
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not paths:
        raise DataError(f"no files in {', '.join(map(str, inputs))}")
    skipped: dict[Path, str] = {}
    rows, version = [], 0
    for batch, result in predicted(client, paths, np.zeros(len(paths), np.int64), batch_size=batch_size,
                                   top_k=top_k, logits=False, workers=workers, strict=strict, model=model,
                                   skipped=skipped):
        rows += [(str(p), [(label, prob) for _, label, prob in top]) for p, top in zip(batch.paths, result.predictions)]
        version = result.model_version
    out = FolderPredictions(rows, {str(p): r for p, r in skipped.items()}, version)
    if csv_path is not None:
        write_csv(out, Path(csv_path), top_k)
        out.csv = str(csv_path)
    return out


def write_csv(predictions: FolderPredictions, path: Path, top_k: int) -> None:
    """path,class,probability, then class_2,probability_2 ... class_K,probability_K."""
    header = ["path", "class", "probability"]
    for i in range(2, top_k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for file, top in predictions.rows:
            cells = [file]
            for label, prob in top:
                cells += [label, f"{prob:.6f}"]
            writer.writerow(cells + [""] * (len(header) - len(cells)))
    os.replace(tmp, path)
