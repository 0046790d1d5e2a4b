"""The fit workloads: `vitserve fit`'s training images/s against a bare TrainStep loop on pre-decoded tensors.

Both train the same server process (`python -m server`, as a deployment runs it) on the same number of images in
batches of the same size, summaries omitted. The fit reads an ImageFolder of PNGs written at twice the model's
height and width (so each file is decoded and resized, as a real dataset's would be) with a fresh output folder
each time, for two epochs: the first decodes every file in the loader's worker threads while the calls run, the
second trains on the decoded images fit keeps. Its images/s are the ones fit.json reports per epoch (from asking
for the epoch's first batch to the last answer; the EvalStep pass and checkpoints are outside). fit starts
decoding an epoch's first batches before the checkpoint that precedes the epoch (SaveCheckpoint fit-last at the
start of the run), as a user's run does, so the batches decoded while the server writes it are not waited for
in the epoch. The bare loop sends tensors decoded once beforehand.
The two alternate within each repeat (rotated), so the ratios are taken pair by pair; the target is fit >= 0.95x
the bare loop.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.stats import Row, Section, pair_ratios, rotated

FIT, FIT_CACHED, BARE = "fit", "fit-cached", "bare"
STEPS = {"digits": 40, "vit-small64": 12}  # train steps per window (a quick run: half)
WORKERS = 2


def write_image_folder(root: Path, class_names: list[str], count: int, size: tuple[int, int], channels: int,
                       seed: int = 0) -> list[Path]:
    """`count` random PNGs of `size` (width, height), spread over the classes in turn; their paths, in order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / class_names[i % len(class_names)]
        folder.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], 3)
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def fit(ctx, preset: str, batch: int) -> list[Row]:
    from bench.workloads import _server_process
    from client import ViTClient
    from client.dataset import read_dataset
    from engine.manifest import Manifest
    from proto.images import Recipe, decode_file

    plan = ctx.plan
    folder = ctx.cache.ensure(preset)
    manifest = Manifest.load(folder)
    prep = manifest.preprocessing
    steps = max(STEPS.get(preset, 12) // (2 if plan.quick else 1), 4)
    scratch = Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"fit-{preset}-"))
    names = list(manifest.class_names)
    size = (prep.width * 2, prep.height * 2)
    write_image_folder(scratch / "train", names, steps * batch, size, prep.channels)
    write_image_folder(scratch / "val", names, len(names), size, prep.channels, seed=1)
    recipe = Recipe.of(prep)
    examples = read_dataset(scratch / "train").examples  # the fit's own order of files and labels
    x = np.stack([decode_file(e.path, recipe) for e in examples])
    y = np.array([names.index(e.label) for e in examples], dtype=np.int64)
    # A server process of its own, as fit meets one: in the benchmark's process the server's gRPC threads would
    # share one GIL with fit's decoding threads (and not with the bare loop), which no deployment does.
    server, address = _server_process([sys.executable, "-m", "server"], folder,
                                      Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"fit-server-{preset}-")),
                                      ("--intra-op-threads", "0"))
    client = ViTClient(address, timeout=600)
    order = np.arange(len(x))

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, len(order), batch):
            client.train_step(x[order[i:i + batch]], y[order[i:i + batch]], summaries=False)
        return len(order) / (time.perf_counter() - start)

    runs = iter(range(10 ** 6))

    def fitted() -> tuple[float, float]:
        """Two epochs: the first decodes every file, the second trains on the decoded images fit keeps."""
        result = client.fit(scratch / "train", scratch / f"out-{next(runs)}", epochs=2, batch_size=batch,
                            val=scratch / "val", workers=WORKERS, progress=False)
        return result.epochs[0]["images_per_s"], result.epochs[1]["images_per_s"]

    fns = {FIT: fitted, BARE: bare}
    try:
        for fn in fns.values():  # warm: the server's sessions, the page cache, the client's imports
            fn()
        ips: dict[str, list[float]] = {FIT: [], FIT_CACHED: [], BARE: []}
        for r in range(plan.repeats):
            for name in rotated(list(fns), r):
                if name == FIT:
                    first, second = fitted()
                    ips[FIT].append(first)
                    ips[FIT_CACHED].append(second)
                else:
                    ips[name].append(fns[name]())
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=60)
    workload = f"fit {preset} b{batch}"
    files = f"{len(x)} PNGs {size[0]}x{size[1]}"
    return [
        Row(Section.TRAIN_STEP, workload, f"fit: {files}, decoded in {WORKERS} threads", "images/s", ips[FIT],
            vs_ort=pair_ratios(ips[FIT], ips[BARE]), key=f"fit/{preset}/fit",
            note="vs raw ORT: vs the bare TrainStep loop (target >= 0.95); first epoch, nothing cached"),
        Row(Section.TRAIN_STEP, workload, "fit, second epoch: the decoded images kept", "images/s", ips[FIT_CACHED],
            vs_ort=pair_ratios(ips[FIT_CACHED], ips[BARE]), key=f"fit/{preset}/fit-cached",
            note="vs raw ORT: vs the bare TrainStep loop (target >= 0.95); what every later epoch runs at"),
        Row(Section.TRAIN_STEP, workload, "bare TrainStep loop on pre-decoded tensors", "images/s", ips[BARE],
            key=f"fit/{preset}/bare", note=f"{steps} steps a window, summaries omitted"),
    ]
