"""Labelled image files for `fit` and `evaluate`, and the image files of a folder for `predict DIR`.

A dataset is an **ImageFolder** (torchvision's layout: one sub-folder per class, named after the class, its
files at any depth below it) or a **CSV** of `path,label` rows (a first row `path,label` is a header; relative
paths are against the CSV's folder). Hidden files and folders (a leading dot) are not examples; neither are files
directly in an ImageFolder's top folder. Every other file is one, whatever its suffix: a file that is not an
image is skipped when it is decoded and named in the run's summary, never dropped unseen.

Labels are class *names*; `class_indices` maps them to the model's classes by name, and a name the model does
not have is a DataError naming it (and the folder or CSV line it came from) before anything is sent.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be used as given: the message names the folder, file, line or class."""


@dataclass(frozen=True)
class Example:
    path: Path
    label: str  # the class name, as the folder or the CSV spells it


@dataclass
class Dataset:
    """Examples in a fixed order (folders and files sorted, CSV rows as written) and where they came from."""
    source: Path
    examples: list[Example] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # class name -> where it was first seen (for errors)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def classes(self) -> list[str]:
        """The class names present, sorted."""
        return sorted({e.label for e in self.examples})

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.label for e in self.examples).items()))

    def subset(self, indices) -> Dataset:
        return Dataset(self.source, [self.examples[i] for i in indices], self.origins)


def read_dataset(path: str | os.PathLike) -> Dataset:
    """An ImageFolder (a directory) or a CSV (a file) of labelled images."""
    path = Path(path)
    if path.is_dir():
        return image_folder(path)
    if path.is_file():
        return csv_dataset(path)
    raise DataError(f"{path}: no such folder or CSV file")


def visible(path: Path) -> bool:
    return not path.name.startswith(".")


def image_files(root: Path) -> list[Path]:
    """Every file below `root` (any depth), sorted, hidden files and folders left out."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".")]
    return found


def image_folder(root: Path) -> Dataset:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and visible(p))
    if not classes:
        raise DataError(f"{root}: no class folders (an ImageFolder has one sub-folder per class)")
    dataset = Dataset(root)
    for folder in classes:
        files = image_files(folder)
        if not files:
            raise DataError(f"{folder}: the class folder '{folder.name}' is empty")
        dataset.examples += [Example(f, folder.name) for f in files]
        dataset.origins[folder.name] = f"folder {folder}"
    return dataset


def csv_dataset(path: Path) -> Dataset:
    dataset = Dataset(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 CSV file of path,label rows") from None
    for line, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if line == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
            continue  # the header
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {line}: expected path,label, got {','.join(row)!r}")
        file, label = Path(row[0].strip()), row[1].strip()
        dataset.examples.append(Example(file if file.is_absolute() else path.parent / file, label))
        dataset.origins.setdefault(label, f"{path}, line {line}")
    if not dataset.examples:
        raise DataError(f"{path}: no path,label rows")
    return dataset


def class_indices(dataset: Dataset, class_names: list[str]) -> np.ndarray:
    """Each example's class as the model's class index (int64), matched by name; an unknown class is a DataError
    naming it, where it came from and the model's classes."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [c for c in dataset.classes if c not in index]
    if unknown:
        shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
        first = unknown[0]
        more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])}{', ...' if len(unknown) > 4 else ''})" \
            if len(unknown) > 1 else ""
        raise DataError(f"class '{first}' ({dataset.origins.get(first, dataset.source)}) is not one of the model's "
                        f"{len(class_names)} classes{more}: {shown}")
    return np.array([index[e.label] for e in dataset.examples], dtype=np.int64)


def stratified_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): `fraction` of each class held out, chosen by `seed` (scikit-learn's
    train_test_split, stratified)."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be between 0 and 1, got {fraction:g}")
    labels = [e.label for e in dataset.examples]
    try:
        train, val = train_test_split(np.arange(len(dataset)), test_size=fraction, random_state=seed, shuffle=True,
                                      stratify=labels)
    except ValueError as e:  # a class too small to be split, a fraction that leaves a side empty
        raise DataError(f"{dataset.source}: cannot hold out {fraction:g} of each class: {e}") from None
    return dataset.subset(np.sort(train)), dataset.subset(np.sort(val))
