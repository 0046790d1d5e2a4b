"""The `ort` trainer's train step timed in another Python environment (.venv-ort: the maintained onnxruntime, no
torch), for the trainer comparison (bench.workloads.trainers). Started by the suite as

    .venv-ort/bin/python -m bench.trainer_worker --threads N

and driven over stdin / stdout, one JSON object a line each way (the worker's logs go to stderr):

    {"op": "open", "id": "a", "folder": DIR, "images": X.npy, "labels": Y.npy, "trainer": "ort", "device": "cpu",
     "warm": 2}
        -> {"ok": true, "open_s": ..., "onnxruntime": "1.31.1"}   a TrainingEngine on the exported folder, warmed up
    {"op": "time", "id": "a", "window": 1.5, "min_steps": 2}
        -> {"ok": true, "times": [s, s, ...]}                     train steps (summaries omitted) on the same batch
    {"op": "close", "id": "a"} -> {"ok": true}
End of input: exit. A failure answers {"ok": false, "error": "..."} and the worker goes on.

The engine is built as bench.workloads.in_process_engine builds its own (session_options(threads, training=True),
learning rate 1e-3), and each step's seconds are measured here, around engine.train_step alone: the pipe's
round trip is not in the figures. While the suite measures its own variants this process waits on stdin.
Imports nothing that needs torch (bench.stats and the engine only).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    from bench.stats import time_calls
    from engine.manifest import Manifest
    from engine.runtime import quiet_default_logger, session_options
    from engine.train.step import TrainingEngine

    quiet_default_logger()
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by the libraries stays off the protocol
    engines: dict[str, tuple] = {}

    def answer(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    answer({"ok": True, "ready": True, "onnxruntime": ort.__version__, "python": platform.python_version()})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            op = msg["op"]
            if op == "open":
                started = time.perf_counter()
                engine = TrainingEngine(Manifest.load(msg["folder"]), msg.get("device", "cpu"),
                                        session_options(args.threads, training=True),
                                        1e-3, trainer=msg.get("trainer", "ort"))
                x, y = np.load(msg["images"]), np.load(msg["labels"])
                step = (lambda e=engine, x=x, y=y: e.train_step(x, y, summaries=False))
                time_calls(step, 0.0, int(msg.get("warm", 2)))
                engines[msg["id"]] = (engine, step)
                answer({"ok": True, "open_s": time.perf_counter() - started, "onnxruntime": ort.__version__,
                        "trainer": engine.trainer})
            elif op == "time":
                _, step = engines[msg["id"]]
                answer({"ok": True, "times": time_calls(step, float(msg["window"]), int(msg["min_steps"]))})
            elif op == "close":
                engines.pop(msg["id"], None)
                answer({"ok": True})
            else:
                answer({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the suite, which turns it into an n/a row
            traceback.print_exc()
            answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
