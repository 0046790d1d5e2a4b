"""The benchmark's workloads: each function measures one thing and returns its table rows (bench.stats.Row).

matmul_peak (section matmul-peak), export_time (export), train (train-step and summaries-cost),
train_compiled (train-step: torch.compile), trainers (trainers: the `ort` trainer on ONNX Runtime 1.31 in
.venv-ort and on 1.19.2 here, the `ort-training` trainer, TrainStep over gRPC on a .venv-ort server, PyTorch
eager), predict (predict), dynamic_batching (dynamic-batching),
data_parallel (data-parallel: one process vs an MPI job of two ranks, real processes); achieved_flops
derives the achieved-flops rows from the measured throughputs and the matmul peak.

All servers are in-process (`server.app.create_server` on 127.0.0.1, port 0, a fresh data
directory) and are called through the real client (`client.ViTClient`) over real channels.
ONNX Runtime runs with the server's defaults (all cores); PyTorch gets the same thread count.
Variants of a workload are measured in turn within each repeat (rotating the order), so
repeat r of a variant and repeat r of its reference ran back to back: the ratios are taken
pair by pair.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.artifacts import MODELS, ROOT, ArtifactCache, input_spec, run_export, threads, torch_model
from bench.stats import Row, Section, pair_ratios, rotated, time_calls

RAW_ORT, GRPC, EAGER, COMPILED, ENGINE = "raw ORT in-process", "Predict over gRPC", "PyTorch eager", "torch.compile", \
    "engine in-process"
TRAIN_GRPC = "TrainStep over gRPC"
ENGINE_BARE = f"{ENGINE} (summaries omitted)"
GRPC_V2 = "ModelInfer over gRPC (KServe v2, tritonclient)"
HTTP_V2 = "ModelInfer over HTTP (KServe v2 REST, tritonclient.http, binary data)"
HTTP_V1 = "Predict over HTTP/JSON (/v1/predict)"
SERVED = (GRPC, GRPC_V2, HTTP_V2, HTTP_V1)  # the server's own variants: compared with raw ORT too


@dataclass
class Plan:
    """How long and how often to measure. `quick()` is the CI smoke-test plan (~2 minutes)."""
    quick: bool = False
    repeats: int = 5  # repeats of every figure (each repeat: one timing window per variant)
    heavy_repeats: int = 5  # repeats of vit-tiny at batch 32 (~3 s a call here)
    train_window: float = 1.5  # seconds of train steps per variant and repeat
    train_min_steps: int = 2
    throughput_window: float = 1.0  # seconds of predict calls per variant and repeat (batch 8/32)
    throughput_min_calls: int = 1
    latency_window: float = 1.5  # seconds of batch-1 calls per variant and repeat
    latency_min_calls: int = 10
    dynamic_window: float = 4.0  # seconds of 16-client load per setting and repeat
    dynamic_repeats: int = 3
    dynamic_clients: int = 16
    export_repeats: int = 3
    peak_repeats: int = 10
    # repeats of the trainer comparison on timm's ViT-S/16 at 224 (b8: ~2 s a step, so 2 steps a window): with 3,
    # two quiet runs of the same graphs read 0.98x and 0.91x against ort-training; 7 pairs narrow the median
    big_repeats: int = 7
    compile: bool = True
    compile_limit_s: float = 420.0  # per preset: compile + measurement in the subprocess

    @classmethod
    def quick_plan(cls) -> "Plan":
        return cls(quick=True, repeats=3, heavy_repeats=2, train_window=0.5, train_min_steps=1,
                   throughput_window=0.4, latency_window=0.5, latency_min_calls=5, dynamic_window=1.5,
                   dynamic_repeats=2, export_repeats=1, peak_repeats=5, big_repeats=2, compile=False)


ORT_PYTHON = ROOT / ".venv-ort" / "bin" / "python"  # `make ort-env`: the maintained onnxruntime, the ort trainer


class Context:
    def __init__(self, plan: Plan, cache: ArtifactCache, ort_python: Path = ORT_PYTHON):
        self.plan = plan
        self.cache = cache
        self.ort_python = Path(ort_python)
        self.threads = threads()
        self.tmp = Path(tempfile.mkdtemp(prefix="vitserve-bench-"))
        self.info: dict = {}  # extra facts for the JSON (peak, settings, compile times, ...)

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def batch(self, preset: str, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        channels, image_size, classes = input_spec(preset)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((size, channels, image_size, image_size), dtype=np.float32)
        return x, rng.integers(0, classes, size).astype(np.int64)

    def ort_env(self) -> Path:
        """The .venv-ort Python (built once with `make ort-env` when missing); RuntimeError when it cannot be had."""
        if not self.ort_python.exists() and self.ort_python == ORT_PYTHON and "ort_env_build" not in self.info:
            started = time.perf_counter()
            proc = subprocess.run(["make", "ort-env"], cwd=ROOT, capture_output=True, text=True)
            self.info["ort_env_build"] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started)}
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [str(proc.returncode)]
                raise RuntimeError(f"make ort-env failed: {tail[0][:150]}")
        if not self.ort_python.exists():
            raise RuntimeError(f"no {self.ort_python}: run make ort-env")
        return self.ort_python


class Served:
    """An in-process server on 127.0.0.1 (port 0) over `folder`, with its own data directory."""

    def __init__(self, ctx: Context, folder: Path, **settings):
        from server.app import create_server
        from server.auth import Security
        from server.config import Settings
        from server.dataplane import DataPlane
        from server.http import create_http_server

        data = Path(tempfile.mkdtemp(dir=ctx.tmp, prefix="data-"))
        self.settings = Settings(artifacts=folder, host="127.0.0.1", port=0, data_dir=data, log_level="WARNING", metrics_port=-1,
                                 **settings)
        self.plane = DataPlane(self.settings)
        self.server, self.port = create_server(self.settings, self.plane)
        self.address = f"127.0.0.1:{self.port}"
        self.http = create_http_server(self.settings.model_copy(update={"http_port": 0}), self.plane, Security())
        self.http_address = f"127.0.0.1:{self.http.port}"

    def client(self):
        from client import ViTClient

        return ViTClient(self.address, timeout=600)

    def close(self):
        self.http.stop()
        self.server.stop(None).wait()
        try:
            self.plane.close()
        except Exception:
            pass


def _warm(fn, seconds: float = 0.3, calls: int = 2):
    time_calls(fn, seconds, calls)


def _na(section, workload, variants, unit, reason, key_prefix="") -> list[Row]:
    return [Row(section, workload, v, unit, note=f"n/a: {reason}", key=f"{key_prefix}/{v}") for v in variants]


# ---- matmul-peak: the machine's practical peak -------------------------------------------------------------

def matmul_peak(ctx: Context, n: int = 2048) -> list[Row]:
    """Best GFLOP/s of a float32 n x n matmul: numpy (the reference for % of peak) and torch.mm."""
    import torch
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2 * n ** 3
    rows = []
    with threadpool_limits(limits=ctx.threads, user_api="blas"):  # a TrainingEngine in this process set it to 1
        for variant, fn in (("numpy @ (OpenBLAS)", lambda: a @ b),
                            ("torch.mm", lambda ta=torch.from_numpy(a), tb=torch.from_numpy(b): torch.mm(ta, tb))):
            _warm(fn, 0.2, 2)
            times = time_calls(fn, 0.0, ctx.plan.peak_repeats)
            gflops = [flop / t / 1e9 for t in times]
            rows.append(Row(Section.MATMUL_PEAK, f"matmul {n}x{n} f32 peak", variant, "GFLOP/s", gflops,
                            value=max(gflops), note=f"best of {len(gflops)} (median shown in spread)",
                            key=f"peak/{variant}"))
    return rows


# ---- train-step + summaries-cost: train steps --------------------------------------------------------------

def eager_train_step(preset: str, folder: Path, x: np.ndarray, y: np.ndarray):
    """PyTorch eager's train step on the exported weights and one batch: forward, cross-entropy, backward, AdamW."""
    import torch
    import torch.nn.functional as F

    model = torch_model(preset, folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def train(ctx: Context, preset: str, batch: int) -> list[Row]:
    plan = ctx.plan
    folder = ctx.cache.ensure(preset)
    served = Served(ctx, folder)
    client = served.client()
    try:
        x, y = ctx.batch(preset, batch)
        torch_step = eager_train_step(preset, folder, x, y)

        # The in-process reference: a TrainingEngine of its own in this process, as a user embedding engine/
        # would run it (the server's own engine is in its training process, behind a pipe).
        engine = in_process_engine(folder, ctx.threads)
        engine_off = lambda: engine.train_step(x, y, summaries=False)  # noqa: E731
        fns = {
            ENGINE: lambda: engine.train_step(x, y, summaries=True),
            ENGINE_BARE: engine_off,  # the training step itself, against eager: eager computes no summaries
            TRAIN_GRPC: lambda: client.train_step(x, y),
            EAGER: torch_step,
        }
        no_summaries = lambda: client.train_step(x, y, summaries=False)  # noqa: E731
        for fn in (*fns.values(), no_summaries):
            _warm(fn, 0.0, 2)
        steps = {name: [] for name in (*fns, "full", "off", "engine full", "engine off")}  # s/step, one per repeat
        for r in range(plan.repeats):
            for name in rotated([*fns, Section.SUMMARIES_COST], r):
                if name == Section.SUMMARIES_COST:  # full vs omitted summaries, step by step (order swaps per pair)
                    for where, full_fn, off_fn in (("", fns[TRAIN_GRPC], no_summaries),
                                                   ("engine ", fns[ENGINE], engine_off)):
                        full, off = _alternate(full_fn, off_fn, plan.train_window * 2, plan.train_min_steps)
                        steps[where + "full"].append(sum(full) / len(full))
                        steps[where + "off"].append(sum(off) / len(off))
                    continue
                times = time_calls(fns[name], plan.train_window, plan.train_min_steps)
                steps[name].append(sum(times) / len(times))
    finally:
        client.close()
        served.close()

    ips = {name: [batch / s for s in v] for name, v in steps.items()}
    workload = f"train {preset} b{batch}"
    from onnxruntime import __version__ as this_ort

    which = f"trainer {engine.trainer}, onnxruntime {this_ort} (this process; the section trainers has both)"
    rows = [
        Row(Section.TRAIN_STEP, workload, ENGINE + " (summaries)", "images/s", ips[ENGINE],
            vs_torch=pair_ratios(ips[ENGINE], ips[EAGER]), key=f"train/{preset}/engine", note=which),
        Row(Section.TRAIN_STEP, workload, ENGINE_BARE, "images/s", ips[ENGINE_BARE],
            vs_torch=pair_ratios(ips[ENGINE_BARE], ips[EAGER]), key=f"train/{preset}/engine-bare", note=which),
        Row(Section.TRAIN_STEP, workload, TRAIN_GRPC + " (summaries)", "images/s", ips[TRAIN_GRPC],
            vs_torch=pair_ratios(ips[TRAIN_GRPC], ips[EAGER]), vs_ort=pair_ratios(ips[TRAIN_GRPC], ips[ENGINE]),
            note="vs raw ORT: vs the engine in-process", key=f"train/{preset}/grpc"),
        Row(Section.TRAIN_STEP, workload, EAGER + " + AdamW", "images/s", ips[EAGER], key=f"train/{preset}/eager"),
    ]
    rows += _summary_rows(workload, preset, "", TRAIN_GRPC, steps["full"], steps["off"])
    rows += _summary_rows(workload, preset, "engine-", ENGINE, steps["engine full"], steps["engine off"])
    ctx.info.setdefault("train_eager_images_per_s", {})[preset] = ips[EAGER]
    return rows


def in_process_engine(folder: Path, threads: int, trainer: str = "ort"):
    from engine.manifest import Manifest
    from engine.runtime import session_options
    from engine.train.step import TrainingEngine

    return TrainingEngine(Manifest.load(folder), "cpu", session_options(threads, training=True), 1e-3, trainer=trainer)


def _summary_rows(workload, preset, prefix, what, full, off) -> list[Row]:
    return [
        Row(Section.SUMMARIES_COST, workload, what + ", full summaries", "ms/step", [s * 1e3 for s in full],
            key=f"summaries/{preset}/{prefix}full"),
        Row(Section.SUMMARIES_COST, workload, what + ", summaries omitted", "ms/step", [s * 1e3 for s in off],
            key=f"summaries/{preset}/{prefix}off"),
        Row(Section.SUMMARIES_COST, workload, what + ": summaries overhead", "%",
            [(f - o) / f * 100 for f, o in zip(full, off)],
            note="(full - omitted) / full; steps alternate full / omitted; one figure per repeat",
            key=f"summaries/{preset}/{prefix}overhead"),
    ]


def _alternate(a, b, window_s: float, min_pairs: int) -> tuple[list[float], list[float]]:
    """Seconds of calls to a and b, alternating (a b, b a, a b, ...) until window_s passed and min_pairs pairs ran."""
    ta, tb = [], []
    start = time.perf_counter()
    while len(ta) < min_pairs or time.perf_counter() - start < window_s:
        for fn, out in ((a, ta), (b, tb)) if len(ta) % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return ta, tb


def train_compiled(ctx: Context, preset: str, batch: int) -> list[Row]:
    """torch.compile(model) + eager AdamW in a subprocess (bench.compile_worker) with a time limit."""
    plan = ctx.plan
    workload = f"train {preset} b{batch}"
    key = f"train/{preset}/compiled"
    if not plan.compile:
        return [Row(Section.TRAIN_STEP, workload, COMPILED + " + AdamW", "images/s", note="n/a: skipped with --quick",
                    key=key)]
    folder = ctx.cache.ensure(preset)
    cmd = [sys.executable, "-m", "bench.compile_worker", "--preset", preset, "--folder", str(folder),
           "--batch", str(batch), "--repeats", str(plan.repeats), "--window", str(plan.train_window),
           "--min-steps", str(plan.train_min_steps), "--threads", str(ctx.threads)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=plan.compile_limit_s)
    except subprocess.TimeoutExpired:
        return [Row(Section.TRAIN_STEP, workload, COMPILED + " + AdamW", "images/s",
                    note=f"n/a: compile + measurement did not finish in {plan.compile_limit_s:.0f} s", key=key)]
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        return [Row(Section.TRAIN_STEP, workload, COMPILED + " + AdamW", "images/s",
                    note=f"n/a: torch.compile failed: {lines[-1][:160] if lines else proc.returncode}", key=key)]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ctx.info.setdefault("torch_compile", {})[preset] = {"compile_s": out["compile_s"],
                                                        "subprocess_s": time.perf_counter() - started,
                                                        "eager_in_worker": out["eager"]}
    return [Row(Section.TRAIN_STEP, workload, COMPILED + " + AdamW", "images/s", out["compiled"],
                vs_torch=pair_ratios(out["compiled"], out["eager"]),
                note=f"first step (compile) {out['compile_s']:.0f} s; vs eager: eager measured in the same subprocess",
                key=key)]


# ---- trainers: the ort trainer (ORT 1.31 in .venv-ort, ORT 1.19.2 here) vs the ort-training trainer vs eager ----

class TrainerWorker:
    """bench.trainer_worker in another Python (.venv-ort), driven over its stdin / stdout one JSON line at a time."""

    def __init__(self, python: Path, threads: int, log: Path, timeout_s: float = 900.0):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.timeout_s = timeout_s
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([str(python), "-m", "bench.trainer_worker", "--threads", str(threads)], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.hello = self._answer()

    def _drain(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the worker is gone

    def _answer(self) -> dict:
        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            raise RuntimeError(f"trainer worker gave no answer in {self.timeout_s:.0f} s: see {self.log}") from None
        if line is None:
            raise RuntimeError(f"trainer worker exited ({self.proc.poll()}): see {self.log}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"trainer worker: {answer.get('error')}")
        return answer

    def call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


T_NEW, T_OV, T_OLD, T_ARTIFACTS, T_GRPC, T_EAGER = "ort-new", "ort-openvino", "ort-old", "ort-training", "grpc", "eager"
WORKER_VARIANTS = {T_NEW: "cpu", T_OV: "openvino"}  # timed in the .venv-ort worker (its engine ids): their devices


def trainers(ctx: Context, preset: str, batch: int) -> list[Row]:
    """One train step (summaries omitted: PyTorch eager computes none) of each way to train, on the same exported
    folder, weights and batch, rotated within each repeat so that the ratios are pair by pair:

    * the `ort` trainer in-process on the maintained onnxruntime: a TrainingEngine in a worker process of
      .venv-ort (bench.trainer_worker), the step timed inside it, on the CPU execution provider and on
      OpenVINO's (--device openvino);
    * the `ort` trainer in-process on onnxruntime-training 1.19.2 (this process): same graph, older runtime;
    * the `ort-training` trainer in-process (this process): ORT's training build and its artifacts;
    * TrainStep over gRPC (summaries omitted) of a server process of .venv-ort with --trainer ort, all cores;
    * PyTorch eager + AdamW (torch.optim), the same threads.
    The reference for the second ratio column is the ort-training trainer.
    """
    import torch
    from onnxruntime import __version__ as this_ort

    from client import ViTClient
    from engine.manifest import Manifest

    plan = ctx.plan
    workload = f"train {MODELS[preset]['title'] if preset in MODELS else preset} b{batch}"
    keys = {v: f"trainers/{preset}/{v}" for v in (T_NEW, T_OV, T_OLD, T_ARTIFACTS, T_GRPC, T_EAGER)}
    ort_python = ctx.ort_env()
    folder = ctx.cache.ensure(preset)
    manifest = Manifest.load(folder)
    exports = ctx.info.setdefault("exports", {})
    exports[preset] = {"export_s (manifest)": manifest.export_seconds, **ctx.cache.exported.get(preset, {"cached": True})}
    x, y = ctx.batch(preset, batch)
    scratch = Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"trainers-{preset}-"))
    np.save(scratch / "images.npy", x)
    np.save(scratch / "labels.npy", y)
    repeats = plan.big_repeats if preset in MODELS else plan.repeats
    warm = 1 if plan.quick and preset in MODELS else 2  # warm-up steps of each variant (ViT-S/16 b8: seconds each)
    worker = server = client = None
    try:
        worker = TrainerWorker(ort_python, ctx.threads, scratch / "worker.log")
        new_ort = worker.hello["onnxruntime"]
        ctx.info["ort_env"] = {"python_path": str(ort_python), "python": worker.hello["python"], "onnxruntime": new_ort}
        opened = {v: worker.call(op="open", id=v, folder=str(folder), images=str(scratch / "images.npy"),
                                 labels=str(scratch / "labels.npy"), trainer="ort", device=device, warm=warm)
                  for v, device in WORKER_VARIANTS.items()}
        server = _server_process([str(ort_python), "-m", "server", "--trainer", "ort"], folder,
                                 Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"trainers-server-{preset}-")),
                                 ("--intra-op-threads", "0"))
        client = ViTClient(server[1], timeout=600)
        old = in_process_engine(folder, ctx.threads, trainer="ort")
        artifacts = in_process_engine(folder, ctx.threads, trainer="ort-training")
        torch_step = eager_train_step(preset, folder, x, y)

        fns = {T_OLD: lambda: old.train_step(x, y, summaries=False),
               T_ARTIFACTS: lambda: artifacts.train_step(x, y, summaries=False),
               T_GRPC: lambda: client.train_step(x, y, summaries=False),
               T_EAGER: torch_step}
        for fn in fns.values():
            _warm(fn, 0.0, warm)
        steps = {v: [] for v in (*WORKER_VARIANTS, *fns)}  # mean s/step, one per repeat
        for r in range(repeats):
            for name in rotated(list(steps), r):
                if name in WORKER_VARIANTS:
                    times = worker.call(op="time", id=name, window=plan.train_window,
                                        min_steps=plan.train_min_steps)["times"]
                else:
                    times = time_calls(fns[name], plan.train_window, plan.train_min_steps)
                steps[name].append(sum(times) / len(times))
        for v in WORKER_VARIANTS:
            worker.call(op="close", id=v)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            _stop_process(server[0], signal.SIGTERM)
        if worker is not None:
            worker.close()
    ctx.info.setdefault("trainers", {})[preset] = {"batch": batch, "repeats": repeats, "step_s": steps,
                                                   "worker_open_s": {v: o["open_s"] for v, o in opened.items()}}
    ips = {name: [batch / s for s in v] for name, v in steps.items()}
    eager, art = ips[T_EAGER], ips[T_ARTIFACTS]
    from bench.report import fmt_ratio

    export_note = f"; export {manifest.export_seconds:.0f} s (export() incl. check)" if preset in MODELS else ""
    rows = [
        Row(Section.TRAINERS, workload, f"ort trainer, onnxruntime {new_ort} (.venv-ort worker)", "images/s",
            ips[T_NEW], vs_torch=pair_ratios(ips[T_NEW], eager), vs_ort=pair_ratios(ips[T_NEW], art),
            note=f"TrainingEngine in a .venv-ort worker process, step timed inside it{export_note}", key=keys[T_NEW]),
        Row(Section.TRAINERS, workload, f"ort trainer, onnxruntime {new_ort} --device openvino", "images/s",
            ips[T_OV], vs_torch=pair_ratios(ips[T_OV], eager), vs_ort=pair_ratios(ips[T_OV], art),
            note=f"OpenVINO's execution provider (a graph compiled per batch size) in the same worker; "
                 f"{fmt_ratio(pair_ratios(ips[T_OV], ips[T_NEW]))} of the CPU execution provider", key=keys[T_OV]),
        Row(Section.TRAINERS, workload, f"ort trainer, onnxruntime {this_ort} (this process)", "images/s",
            ips[T_OLD], vs_torch=pair_ratios(ips[T_OLD], eager), vs_ort=pair_ratios(ips[T_OLD], art),
            note="same gradient graph as above, on the training build's runtime", key=keys[T_OLD]),
        Row(Section.TRAINERS, workload, f"ort-training trainer, onnxruntime {this_ort}", "images/s", art,
            vs_torch=pair_ratios(art, eager), note="ORT's training artifacts (Module + Optimizer)",
            key=keys[T_ARTIFACTS]),
        Row(Section.TRAINERS, workload, f"TrainStep over gRPC, ort trainer, onnxruntime {new_ort}", "images/s",
            ips[T_GRPC], vs_torch=pair_ratios(ips[T_GRPC], eager), vs_ort=pair_ratios(ips[T_GRPC], art),
            note=f"{fmt_ratio(pair_ratios(ips[T_GRPC], ips[T_NEW]))} of the ort trainer in-process on {new_ort}; "
                 "summaries omitted; a .venv-ort server process", key=keys[T_GRPC]),
        Row(Section.TRAINERS, workload, EAGER + " + AdamW", "images/s", eager, key=keys[T_EAGER],
            note=f"torch {torch.__version__}, {torch.get_num_threads()} threads"),
        Row(Section.TRAINERS, workload, f"ort trainer: onnxruntime {new_ort} / {this_ort}", "x",
            pair_ratios(ips[T_NEW], ips[T_OLD]), note="the same graph on the two runtimes, per repeat pair",
            key=f"trainers/{preset}/runtime-gain"),
    ]
    return rows


# ---- data-parallel: TrainStep images/s of one process vs an MPI job of two ranks ------------------------------

DP_ONE, DP_RANKS = "1 process, 1 ORT thread", "2 ranks over MPI, 1 ORT thread each"
SERVER_START_S = 120.0


def _server_process(command: list[str], folder: Path, data: Path, extra: tuple[str, ...] = ()
                    ) -> tuple[subprocess.Popen, str]:
    """A real server process (`python -m server ...`, or under mpiexec) on port 0; (process, address) once it
    printed its listening line. Its log goes to a file beside its data directory."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    args = ["--artifacts", str(folder), "--data-dir", str(data), "--port", "0", "--http-port", "-1",
            "--metrics-port", "-1", "--intra-op-threads", "1", "--log-level", "WARNING", "--max-batch-size", "256",
            *extra]
    log = open(data.with_suffix(".log"), "wb")
    proc = subprocess.Popen([*command, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.perf_counter() + SERVER_START_S
    for line in proc.stdout:
        if line.startswith("vitserve listening on "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining stdout
            return proc, line.split()[-1]
        if time.perf_counter() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{' '.join(command)} did not start: see {log.name}")


def _stop_process(proc: subprocess.Popen, sig) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def data_parallel(ctx: Context, preset: str, batch: int) -> list[Row]:
    """TrainStep over gRPC (summaries omitted) of `python -m server` with one ORT thread, and of `mpiexec --with-ft
    ulfm -n 2 python -m server --data-parallel` with one thread per rank, alternated per repeat like every workload.
    One thread per rank: the 2-core machine holds exactly two ranks; the single process gets one core as each
    rank does, so the ratio is the data-parallel scaling, not more threads."""
    from client import ViTClient

    plan = ctx.plan
    folder = ctx.cache.ensure(preset)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        return _na(Section.DATA_PARALLEL, f"train {preset} b{batch}", (DP_ONE, DP_RANKS), "images/s",
                   "no mpiexec beside this Python: pip install -r requirements/mpi.txt", f"dp/{preset}")
    server = [sys.executable, "-m", "server"]
    started = {}
    try:
        started[DP_ONE] = _server_process(server, folder, Path(tempfile.mkdtemp(dir=ctx.tmp, prefix="dp1-")))
        started[DP_RANKS] = _server_process([str(mpiexec), "--with-ft", "ulfm", "-n", "2", *server, "--data-parallel",
                                             "--checksum-every-steps", "10"], folder,
                                            Path(tempfile.mkdtemp(dir=ctx.tmp, prefix="dp2-")))
        x, y = ctx.batch(preset, batch)
        clients = {name: ViTClient(address, timeout=600) for name, (_, address) in started.items()}
        fns = {name: (lambda c=c: c.train_step(x, y, summaries=False)) for name, c in clients.items()}
        for fn in fns.values():
            _warm(fn, 0.0, 2)
        steps = {name: [] for name in fns}
        for r in range(plan.repeats):
            for name in rotated(list(fns), r):
                times = time_calls(fns[name], plan.train_window, plan.train_min_steps)
                steps[name].append(sum(times) / len(times))
        for c in clients.values():
            c.close()
    finally:
        for name, (proc, _) in started.items():  # SIGUSR1: the job's graceful stop (SIGTERM makes mpiexec kill it)
            _stop_process(proc, signal.SIGUSR1 if name == DP_RANKS else signal.SIGTERM)
    ips = {name: [batch / s for s in v] for name, v in steps.items()}
    ctx.info.setdefault("data_parallel_step_s", {})[preset] = {name: v for name, v in steps.items()}
    workload = f"train {preset} b{batch}"
    return [
        Row(Section.DATA_PARALLEL, workload, DP_ONE, "images/s", ips[DP_ONE], note="TrainStep over gRPC, summaries "
            "omitted", key=f"dp/{preset}/1"),
        Row(Section.DATA_PARALLEL, workload, DP_RANKS, "images/s", ips[DP_RANKS],
            note="shards of the same batch, gradients all-reduced; weights compared every 10 steps",
            key=f"dp/{preset}/2"),
        Row(Section.DATA_PARALLEL, workload, "2 ranks / 1 process", "x", pair_ratios(ips[DP_RANKS], ips[DP_ONE]),
            note="per repeat: the two ran back to back", key=f"dp/{preset}/speedup"),
    ]


# ---- predict while training: inference beside a training client, the training engine in-process or isolated --

ISOLATIONS = ("thread", "process")  # --train-isolation


def predict_under_training(ctx: Context, preset: str, train_batch: int, clients: int = 4) -> list[Row]:
    """Predict p50 / p99 of `clients` single-image clients against a server process, without and with one client
    running TrainSteps of `train_batch` (full summaries) back to back, for --train-isolation thread and process.
    The load comes from this process (the server is another); one ORT thread per session, so on 2 cores the
    isolated training and the inference sessions each have one."""
    from client import ViTClient

    plan = ctx.plan
    folder = ctx.cache.ensure(preset)
    x, _ = ctx.batch(preset, 1, seed=4)
    tx, ty = ctx.batch(preset, train_batch, seed=5)
    window = plan.dynamic_window
    started, lat, steps, errors = {}, {}, {}, []
    try:
        for iso in ISOLATIONS:
            started[iso] = _server_process([sys.executable, "-m", "server"], folder,
                                           Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"iso-{iso}-")),
                                           ("--train-isolation", iso))
        pools = {iso: [ViTClient(address, timeout=600) for _ in range(clients)] for iso, (_, address) in started.items()}
        trainers = {iso: ViTClient(address, timeout=600) for iso, (_, address) in started.items()}
        for iso in ISOLATIONS:
            _load(pools[iso], x, 0.5)
            _warm(lambda c=trainers[iso]: c.train_step(tx, ty), 0.0, 2)
        for r in range(plan.dynamic_repeats):
            for iso in rotated(list(ISOLATIONS), r):
                for training in (False, True):
                    stop, done = threading.Event(), [0]

                    def train(c=trainers[iso]):
                        while not stop.is_set():
                            c.train_step(tx, ty)
                            done[0] += 1

                    thread = threading.Thread(target=train, daemon=True) if training else None
                    if thread:
                        thread.start()
                    _, _, latencies, errs = _load(pools[iso], x, window)
                    stop.set()
                    if thread:
                        thread.join()
                        steps.setdefault(iso, []).append(done[0])
                    errors += errs
                    lat.setdefault((iso, training), []).append(np.asarray(latencies) * 1e3)
        for c in [*trainers.values(), *(c for pool in pools.values() for c in pool)]:
            c.close()
    finally:
        for proc, _ in started.values():
            _stop_process(proc, signal.SIGTERM)
    workload = f"predict {preset} b1 x{clients} beside train b{train_batch}"
    if errors:
        return _na(Section.ISOLATION, workload, ISOLATIONS, "ms p99", f"client errors: {errors[0][:160]}",
                   f"isolation/{preset}")
    rows = []
    for iso in ISOLATIONS:
        for training in (False, True):
            windows = lat[(iso, training)]
            pooled = np.concatenate(windows)
            label = f"train in a {iso}, " + ("with training" if training else "no training")
            for q in (50, 99):
                rows.append(Row(Section.ISOLATION, workload, label, f"ms p{q}",
                                [float(np.percentile(w, q)) for w in windows], value=float(np.percentile(pooled, q)),
                                note=f"{len(pooled)} calls" + (f", {sum(steps[iso])} train steps" if training else ""),
                                key=f"isolation/{preset}/{iso}/{'train' if training else 'idle'}/p{q}"))
        with_p99 = [float(np.percentile(w, 99)) for w in lat[(iso, True)]]
        idle_p99 = [float(np.percentile(w, 99)) for w in lat[(iso, False)]]
        rows.append(Row(Section.ISOLATION, workload, f"train in a {iso}: p99 with / without training", "x",
                        [a / b for a, b in zip(with_p99, idle_p99)], note="per repeat pair (lower is better)",
                        key=f"isolation/{preset}/{iso}/p99-ratio"))
    return rows


# ---- predict -----------------------------------------------------------------------------------------------

def predict(ctx: Context, preset: str, batches=(8, 32)) -> list[Row]:
    import onnxruntime as ort
    import torch

    plan = ctx.plan
    folder = ctx.cache.ensure(preset)
    import base64
    import json
    import urllib.request

    import tritonclient.grpc as tc
    import tritonclient.http as th

    served = Served(ctx, folder)
    client = served.client()
    v2 = tc.InferenceServerClient(served.address)
    v2_http = th.InferenceServerClient(served.http_address)
    model_name = served.plane.registry.model().manifest.name
    settings = served.settings
    served_note = (f"server defaults: dynamic batching {'on' if settings.dynamic_batching else 'off'}, "
                   f"delay {settings.max_batch_delay_ms} ms")
    ctx.info["server_settings"] = {k: str(v) for k, v in settings.model_dump().items()
                                   if k not in ("artifacts", "data_dir", "port")}
    rows = []
    try:
        session = ort.InferenceSession(str(folder / "inference.onnx"), providers=["CPUExecutionProvider"])
        model = torch_model(preset, folder).eval()

        def variants(x):
            xt = torch.from_numpy(x)
            v2_input = tc.InferInput("images", list(x.shape), "FP32")
            v2_input.set_data_from_numpy(x)
            http_input = th.InferInput("images", list(x.shape), "FP32")
            http_input.set_data_from_numpy(x, binary_data=True)
            http_output = [th.InferRequestedOutput("logits", binary_data=True)]
            v1_body = json.dumps({"images": {"tensor": {"dtype": "FLOAT32", "shape": list(x.shape),
                                                        "data": base64.b64encode(x.tobytes()).decode()}}}).encode()

            def v1_http():
                request = urllib.request.Request(f"http://{served.http_address}/v1/predict", data=v1_body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=600) as answer:
                    return answer.read()

            def eager():
                with torch.inference_mode():
                    return model(xt).numpy()

            return {RAW_ORT: lambda: session.run(["logits"], {"images": x})[0],
                    GRPC: lambda: client.predict(x, return_logits=False),
                    GRPC_V2: lambda: v2.infer(model_name, [v2_input]).as_numpy("logits"),
                    HTTP_V2: lambda: v2_http.infer(model_name, [http_input], outputs=http_output).as_numpy("logits"),
                    HTTP_V1: v1_http,
                    EAGER: eager}

        # batch 1: latency
        x1, _ = ctx.batch(preset, 1, seed=1)
        fns = variants(x1)
        for fn in fns.values():
            _warm(fn)
        calls = {name: [] for name in fns}  # per repeat: the list of call latencies (s)
        for r in range(plan.repeats):
            for name in rotated(list(fns), r):
                calls[name].append(time_calls(fns[name], plan.latency_window, plan.latency_min_calls))
        workload = f"predict {preset} b1"
        for q, label in ((50, "p50"), (99, "p99")):
            per = {name: [float(np.percentile(c, q)) * 1e3 for c in reps] for name, reps in calls.items()}
            pooled = {name: float(np.percentile(np.concatenate(reps), q)) * 1e3 for name, reps in calls.items()}
            for name in fns:
                rows.append(Row(
                    Section.PREDICT, workload, name, f"ms {label}", per[name], value=pooled[name],
                    note=(served_note + "; " if name in SERVED else "") +
                    f"{label} of {sum(map(len, calls[name]))} calls; spread: per-repeat {label}",
                    vs_torch=None if name == EAGER else pair_ratios(per[name], per[EAGER], higher_is_better=False),
                    vs_ort=pair_ratios(per[name], per[RAW_ORT], higher_is_better=False) if name in SERVED else None,
                    key=f"latency/{preset}/{label}/{name}"))

        for size in batches:
            x, _ = ctx.batch(preset, size, seed=size)
            fns = variants(x)
            for fn in fns.values():
                _warm(fn, 0.0, 1)
            ips = {name: [] for name in fns}
            repeats = plan.heavy_repeats if preset == "vit-tiny" and size >= 32 else plan.repeats
            for r in range(repeats):
                for name in rotated(list(fns), r):
                    times = time_calls(fns[name], plan.throughput_window, plan.throughput_min_calls)
                    ips[name].append(len(times) * size / sum(times))
            for name in fns:
                rows.append(Row(
                    Section.PREDICT, f"predict {preset} b{size}", name, "images/s", ips[name],
                    note=served_note if name in SERVED else "",
                    vs_torch=None if name == EAGER else pair_ratios(ips[name], ips[EAGER]),
                    vs_ort=pair_ratios(ips[name], ips[RAW_ORT]) if name in SERVED else None,
                    key=f"predict/{preset}/b{size}/{name}"))
    finally:
        client.close()
        v2.close()
        v2_http.close()
        served.close()
    return rows


# ---- dynamic-batching --------------------------------------------------------------------------------------

DYNAMIC_FIELDS = ("dynamic_batching", "max_batch_delay_ms", "max_dynamic_batch", "workers")


def _load(clients, x, seconds: float) -> tuple[int, float, list[float], list[str]]:
    """Each client (own thread, own channel) sends single-image Predicts until the deadline."""
    latencies = [[] for _ in clients]
    errors: list[str] = []
    barrier = threading.Barrier(len(clients) + 1)
    clock = {}

    def worker(i):
        barrier.wait()
        deadline = clock["start"] + seconds
        c = clients[i]
        try:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                c.predict(x, top_k=1)
                latencies[i].append(time.perf_counter() - t)
        except Exception as e:  # reported, and the figure is dropped
            errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(clients))]
    for t in pool:
        t.start()
    clock["start"] = time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - clock["start"]
    flat = [l for per in latencies for l in per]
    return len(flat), elapsed, flat, errors


def dynamic_batching(ctx: Context, preset: str) -> list[Row]:
    """16 client threads (own ViTClient each) x single-image Predicts against a server process with batching off /
    on: the load comes from this process, the server is another (its default threads and batcher settings).

    Also measures, in the same rotation, raw in-process ORT running the same images as one batch of
    `dynamic_clients` rows: the throughput the batcher could at best reach (the 'vs raw ORT' column). The batch
    sizes the server ran come from its v2 ModelStatistics (batch_stats).
    """
    import onnxruntime as ort
    import tritonclient.grpc as triton_grpc

    from client import ViTClient
    from server.config import Settings

    plan = ctx.plan
    n = plan.dynamic_clients
    workload = f"dynamic batching {preset}, {n} clients x 1 image"
    variants = ["batching off", "batching on"]
    ceiling = f"raw ORT in-process b{n} (ceiling)"
    folder = ctx.cache.ensure(preset)
    started, clients = {}, {}
    try:
        for v in variants:
            flag = "--dynamic-batching" if v == "batching on" else "--no-dynamic-batching"
            started[v] = _server_process([sys.executable, "-m", "server"], folder,
                                         Path(tempfile.mkdtemp(dir=ctx.tmp, prefix="batching-")),
                                         (flag, "--intra-op-threads", "0"))
            clients[v] = [ViTClient(started[v][1], timeout=600) for _ in range(n)]
        defaults = Settings()
        ctx.info["dynamic_batching_settings"] = {k: getattr(defaults, k) for k in DYNAMIC_FIELDS}
        x, _ = ctx.batch(preset, 1, seed=3)
        session = ort.InferenceSession(str(folder / "inference.onnx"), providers=["CPUExecutionProvider"])
        xb = np.repeat(x, n, axis=0)
        _warm(lambda: session.run(["logits"], {"images": xb}), 0.2, 2)
        for v in variants:
            _load(clients[v], x, 0.5)  # warm-up: channels connected, sessions warm

        def batch_counts() -> dict[int, int]:
            stats = triton_grpc.InferenceServerClient(started["batching on"][1]).get_inference_statistics()
            return {int(b.batch_size): int(b.compute_infer.count) for m in stats.model_stats for b in m.batch_stats}

        warm_counts = batch_counts()
        thr = {v: [] for v in [*variants, ceiling]}
        p99 = {v: [] for v in variants}
        pooled = {v: [] for v in variants}
        errors = []
        for r in range(plan.dynamic_repeats):
            for v in rotated([*variants, ceiling], r):
                if v == ceiling:
                    times = time_calls(lambda: session.run(["logits"], {"images": xb}), plan.throughput_window, 1)
                    thr[v].append(len(times) * n / sum(times))
                    continue
                count, elapsed, lat, errs = _load(clients[v], x, plan.dynamic_window)
                errors += errs
                thr[v].append(count / elapsed)
                p99[v].append(float(np.percentile(lat, 99)) * 1e3 if lat else float("nan"))
                pooled[v] += lat
        batches = {size: count - warm_counts.get(size, 0) for size, count in batch_counts().items()
                   if count - warm_counts.get(size, 0) > 0}
    finally:
        for v in clients:
            for c in clients[v]:
                c.close()
        for proc, _ in started.values():
            _stop_process(proc, signal.SIGTERM)
    if errors:
        return _na(Section.DYNAMIC_BATCHING, workload, variants, "images/s", f"client errors: {errors[0][:160]}",
                   f"dynamic/{preset}")
    d = ctx.info["dynamic_batching_settings"]
    on_note = ", ".join(f"{k} {d[k]}" for k in ("max_batch_delay_ms", "max_dynamic_batch", "workers"))
    if batches:
        count = sum(batches.values())
        mean = sum(k * v for k, v in batches.items()) / count
        on_note += f"; {count} batches, mean {mean:.1f} rows, max {max(batches)}"
        ctx.info.setdefault("dynamic_batch_sizes", {})[preset] = {str(k): v for k, v in sorted(batches.items())}
    rows = []
    for v in variants:
        rows.append(Row(Section.DYNAMIC_BATCHING, workload, v, "images/s", thr[v],
                        vs_ort=pair_ratios(thr[v], thr[ceiling]), key=f"dynamic/{preset}/{v}",
                        note=f"{plan.dynamic_window:g} s windows, load from another process" +
                        (f"; {on_note}" if v == "batching on" else "")))
    rows.append(Row(Section.DYNAMIC_BATCHING, workload, ceiling, "images/s", thr[ceiling],
                    key=f"dynamic/{preset}/ceiling",
                    note="the same images as one batch, no gRPC: the most batching could give"))
    for v in variants:
        rows.append(Row(Section.DYNAMIC_BATCHING, workload, v, "ms p99", p99[v],
                        value=float(np.percentile(pooled[v], 99)) * 1e3,
                        note=f"p99 of {len(pooled[v])} calls; spread: per-window p99", key=f"dynamic/{preset}/p99/{v}"))
    rows.append(Row(Section.DYNAMIC_BATCHING, workload, "on/off speedup", "x",
                    pair_ratios(thr["batching on"], thr["batching off"]),
                    note="throughput, per repeat pair", key=f"dynamic/{preset}/speedup"))
    return rows


# ---- export: export time -----------------------------------------------------------------------------------

def export_time(ctx: Context, preset: str = "vit-tiny") -> list[Row]:
    """`python -m model.export --preset vit-tiny` into a scratch folder; the first result fills the cache."""
    wall, inner = [], []
    for _ in range(ctx.plan.export_repeats):
        out = Path(tempfile.mkdtemp(dir=ctx.tmp, prefix="export-"))
        result = run_export(preset, out)
        wall.append(result["wall_s"])
        inner.append(result["export_s"])
        if not ctx.cache.has(preset):
            ctx.cache.adopt(preset, result["folder"])
        shutil.rmtree(out, ignore_errors=True)
    return [
        Row(Section.EXPORT, f"export {preset}", "python -m model.export (process)", "s", wall,
            key=f"export/{preset}/process", note="wall clock: imports + export + check vs PyTorch"),
        Row(Section.EXPORT, f"export {preset}", "export() incl. parity check", "s", inner, key=f"export/{preset}/inner",
            note="the manifest's export_seconds"),
    ]


# ---- achieved-flops: achieved GFLOP/s (derived from the rows above) ----------------------------------------

def achieved_flops(rows: list[Row], peak: float) -> list[Row]:
    """GFLOP/s and % of the matmul peak of every train-step and predict throughput row (batch >= 8)."""
    from bench.flops import forward_flops, train_flops
    from model.vit import PRESETS

    out = []
    for row in rows:
        if row.unit != "images/s" or row.section not in (Section.TRAIN_STEP, Section.PREDICT) or not row.samples:
            continue
        kind, preset, *_ = row.key.split("/")
        flop = train_flops(PRESETS[preset]) if kind == "train" else forward_flops(PRESETS[preset])
        gflops = [s * flop / 1e9 for s in row.samples]
        out.append(Row(Section.ACHIEVED_FLOPS, row.workload, row.variant, "GFLOP/s", gflops, key=f"flops/{row.key}",
                       peak_pct=[g / peak * 100 for g in gflops], other_load=row.other_load,
                       note=f"{flop / 1e9:.3g} GFLOP/image ({'3x forward' if kind == 'train' else 'forward'})"))
    return out
