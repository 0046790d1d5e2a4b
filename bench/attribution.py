"""Faithfulness of the attribution maps, measured: the deletion test on the demo's fine-tuned model.

    python -m bench.attribution [--demo demo-output] [--out bench/results]        (make attribution-check)

Reads what `make demo` leaves: the export (demo-output/artifacts/digits-hf), the newest version fit published
(demo-output/server-data/digits-hf/models) and the digits test split (demo-output/digits/test). For every test
image and every method (rollout, chefer, gradxinput, and a random order as the baseline) the grid cells are
ranked by the map; the top n cells are removed (set to the test images' mean) for n = 0 .. all, and the
probability of the class predicted on the whole image is read from the published model. A map that finds the
cells the prediction rests on makes that probability fall fast: the smaller the area under the curve
(probability against the fraction removed), the more faithful the map. Prints a table, writes
attribution.json and attribution.png to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from client.dataset import read_dataset
from engine.graph.attribution import AttributionEngine, published_weights
from engine.manifest import Manifest
from engine.runtime import session_options
from engine.store.files import VersionStore
from proto.images import Recipe, decode_file

MODEL = "digits-hf"  # the demo's export
METHODS = ("rollout", "chefer", "gradxinput", "random")
BATCH = 128


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rankings(engine: AttributionEngine, images: np.ndarray, weights: dict, method: str, rng) -> np.ndarray:
    """(n, cells) cell indices, most attributed first."""
    cells = int(np.prod(engine.record.grid))
    if method == "random":
        return np.stack([rng.permutation(cells) for _ in range(len(images))])
    order = []
    for a in range(0, len(images), BATCH):
        for item in engine.attribute(images[a:a + BATCH], None, method, weights=weights):
            order.append(np.argsort(-item.map.reshape(-1), kind="stable"))
    return np.stack(order)


def deleted(images: np.ndarray, order: np.ndarray, n: int, grid, patch, fill: np.ndarray) -> np.ndarray:
    """`images` with each image's first `n` cells of `order` set to `fill` (per channel)."""
    out = images.copy()
    gw = grid[1]
    for i in range(len(images)):
        for cell in order[i, :n]:
            r, c = divmod(int(cell), gw)
            out[i, :, r * patch[0]:(r + 1) * patch[0], c * patch[1]:(c + 1) * patch[1]] = fill
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attribution", description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("demo-output"), help="what `make demo` wrote")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for attribution.json and .png")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order")
    args = p.parse_args(argv)

    folder, store = args.demo / "artifacts" / MODEL, VersionStore(args.demo / "server-data" / MODEL / "models")
    if not (folder / "manifest.json").is_file() or not store.versions():
        print(f"error: no fine-tuned demo model under {args.demo}: run `make demo` first", file=sys.stderr)
        return 2
    manifest = Manifest.load(folder)
    version = store.versions()[-1]
    model_path = store.model_path(version.version)
    weights = published_weights(manifest, model_path)
    engine = AttributionEngine(manifest)
    session = ort.InferenceSession(str(model_path), session_options(training=False), providers=["CPUExecutionProvider"])

    recipe = Recipe.of(manifest.preprocessing)
    dataset = read_dataset(args.demo / "digits" / "test")
    images = np.stack([decode_file(e.path, recipe) for e in dataset.examples])
    fill = images.mean(axis=(0, 2, 3)).reshape(-1, 1, 1)  # "removed": the test images' mean, per channel

    def probabilities(x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        logits = np.concatenate([session.run(None, {manifest.input_name: x[a:a + BATCH]})[0]
                                 for a in range(0, len(x), BATCH)])
        return softmax(logits)[np.arange(len(x)), classes]

    logits = np.concatenate([session.run(None, {manifest.input_name: images[a:a + BATCH]})[0]
                             for a in range(0, len(images), BATCH)])
    predicted = logits.argmax(axis=1)
    record = engine.record
    cells = int(np.prod(record.grid))
    fractions = np.arange(cells + 1) / cells
    rng = np.random.default_rng(args.seed)
    curves = {}
    for method in METHODS:
        order = rankings(engine, images, weights, method, rng)
        curves[method] = [float(probabilities(deleted(images, order, n, record.grid, record.patch, fill),
                                              predicted).mean()) for n in range(cells + 1)]
    areas = {m: float(np.trapezoid(c, fractions)) for m, c in curves.items()}

    print(f"deletion test: {len(images)} test images, model version {version.version} of {MODEL}, "
          f"{cells} cells of {record.patch[0]}x{record.patch[1]} px, removed = the test images' mean")
    print(f"{'method':<12}{'AUC':>8}{'p(0%)':>9}{'p(25%)':>9}{'p(50%)':>9}   (lower AUC: more faithful)")
    for method in sorted(METHODS, key=areas.get):
        c = curves[method]
        print(f"{method:<12}{areas[method]:>8.3f}{c[0]:>9.3f}{c[cells // 4]:>9.3f}{c[cells // 2]:>9.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attribution.json").write_text(json.dumps(
        {"model": MODEL, "version": version.version, "images": len(images), "cells": cells,
         "fractions": fractions.tolist(), "curves": curves, "auc": areas}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in METHODS:
        ax.plot(fractions * 100, curves[method], marker="o", markersize=3,
                linestyle="--" if method == "random" else "-", label=f"{method} (AUC {areas[method]:.3f})")
    ax.set_xlabel("grid cells removed, most attributed first (%)")
    ax.set_ylabel("probability of the predicted class")
    ax.set_title(f"Deletion test: {len(images)} digits, {MODEL} v{version.version}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "attribution.png")
    print(f"wrote {args.out / 'attribution.json'} and {args.out / 'attribution.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
