"""Table rows, summaries of repeated measurements and the timing loops every workload uses."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class Section:
    """What a row measures: the sections of the table, by name (bench.report.SECTIONS: their titles and order)."""
    TRAIN_STEP = "train-step"  # images/s of train steps: engine, TrainStep over gRPC, PyTorch eager, torch.compile
    TRAINERS = "trainers"  # images/s of the ort trainer (ORT 1.31 / 1.19.2), the ort-training trainer, gRPC, eager
    PREDICT = "predict"  # Predict latency (batch 1) and throughput (batch 8 / 32)
    DYNAMIC_BATCHING = "dynamic-batching"  # many single-image clients, server batching on vs off
    SUMMARIES_COST = "summaries-cost"  # train steps with full vs omitted gradient summaries
    MATMUL_PEAK = "matmul-peak"  # float32 matmul GFLOP/s: the 100% of achieved-flops
    ACHIEVED_FLOPS = "achieved-flops"  # GFLOP/s of the train-step and predict throughputs, as % of the matmul peak
    EXPORT = "export"  # python -m model.export
    DATA_PARALLEL = "data-parallel"  # TrainStep images/s: one process vs an MPI job of two ranks (one thread each)
    ISOLATION = "isolation"  # Predict p50/p99 beside a training client: training in the server process vs a child
    FAILED = "failed"  # a workload that raised: its error


# What a section's vs_ort ratios are against, when it is not raw in-process ONNX Runtime: (JSON name, column title).
REFERENCES = {Section.TRAINERS: ("vs_ort_training", "vs ort-training")}


def summarize(samples: list[float]) -> dict:
    """median, p10, p90, min, max and n of a list of samples (empty -> n = 0 only)."""
    a = np.asarray([s for s in samples if s is not None and np.isfinite(s)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "min": float(a.min()), "max": float(a.max())}


@dataclass
class Row:
    """One line of the table: a figure measured `len(samples)` times (one sample per repeat).

    vs_torch / vs_ort hold one ratio per repeat, each computed against the reference's sample
    of the same repeat; a ratio is a speedup (> 1: this variant is faster / better).
    `value` overrides the median shown (pooled percentiles of latencies); `note` says why a
    figure is missing ("n/a: ...") or how it was measured.
    """
    section: str  # a Section name
    workload: str
    variant: str
    unit: str
    samples: list[float] = field(default_factory=list)
    vs_torch: list[float] | None = None
    vs_ort: list[float] | None = None
    value: float | None = None
    note: str = ""
    key: str = ""  # stable id for targets and the chart, e.g. "train/vit-small64/grpc"
    peak_pct: list[float] | None = None  # achieved-flops: each sample as % of the measured matmul peak
    other_load: float | None = None  # % of all cores other processes used while this row's workload ran

    @property
    def summary(self) -> dict:
        s = summarize(self.samples)
        if self.value is not None and s["n"]:
            s["median"] = float(self.value)
        return s

    @property
    def median(self) -> float | None:
        return self.summary.get("median")

    def as_dict(self) -> dict:
        out = {"key": self.key, "section": self.section, "workload": self.workload, "variant": self.variant,
               "unit": self.unit, "note": self.note, "other_load_pct": self.other_load, "samples": self.samples,
               **self.summary}
        vs_ort_name = REFERENCES.get(self.section, ("vs_raw_ort",))[0]
        for name, ratios in (("vs_torch_eager", self.vs_torch), (vs_ort_name, self.vs_ort),
                             ("percent_of_peak", self.peak_pct)):
            if ratios:
                out[name] = {**summarize(ratios), "samples": ratios}
        return out


def pair_ratios(a: list[float], b: list[float], higher_is_better: bool = True) -> list[float]:
    """Per-repeat speedups of a over b: a_r / b_r for throughputs, b_r / a_r for times."""
    return [(x / y if higher_is_better else y / x) for x, y in zip(a, b) if x and y]


def time_calls(fn: Callable[[], object], window_s: float, min_calls: int) -> list[float]:
    """Call fn until window_s seconds have passed and at least min_calls calls were made; each call's seconds."""
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < window_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def rotated(names: list[str], r: int) -> list[str]:
    """The order of the variants in repeat r: rotated so that no variant always runs first (drift, warm caches)."""
    k = r % len(names)
    return names[k:] + names[:k]
