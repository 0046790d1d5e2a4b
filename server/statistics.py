"""Inference statistics per model version, as Triton keeps them (the v2 ModelStatistics RPC).

Measured on the inference path that Predict and ModelInfer share: the data plane opens one timed
request per call (DataPlane.inference_request), the batcher times every run (server/batching.py's
Run: preparing the input, the ONNX Runtime run, handing out the rows) and tells each request how
long it queued (Answer). `Statistics` adds them up under a lock, per model version:

* per request: success (count and time from the request reaching the model to its answer), fail
  (requests for the model that raised: invalid input or a failed run), and for the successful ones
  the time queued and their batch's compute_input, compute_infer and compute_output (every request
  of a batch is charged its batch's times, as Triton does);
* per run: execution_count, and batch_stats per batch size (count and the three compute times);
* inference_count (images of successful requests) and last_inference (ms since the epoch).

The records are proto/records/v2.py's; proto/convert.py turns them into the v2 messages.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from proto.records.v2 import BatchStatistics, Duration, InferStatistics, ModelStatistics
from server.batching import Answer, Run


@dataclass
class _Totals:
    """[count, ns] pairs, mutated under Statistics' lock."""
    success: list = field(default_factory=lambda: [0, 0])
    fail: list = field(default_factory=lambda: [0, 0])
    queue: list = field(default_factory=lambda: [0, 0])
    compute_input: list = field(default_factory=lambda: [0, 0])
    compute_infer: list = field(default_factory=lambda: [0, 0])
    compute_output: list = field(default_factory=lambda: [0, 0])
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0
    batches: dict = field(default_factory=dict)  # batch size -> [count, input_ns, infer_ns, output_ns]


def _add(pair: list, ns: int) -> None:
    pair[0] += 1
    pair[1] += ns


class Statistics:
    """Thread-safe totals per model version (only versions that ran, failed or were asked for appear)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[int, _Totals] = {}

    def _totals(self, version: int) -> _Totals:
        return self._versions.setdefault(version, _Totals())

    def record_run(self, run: Run) -> None:
        """A successful run (once per batch)."""
        with self._lock:
            totals = self._totals(run.version)
            totals.execution_count += 1
            batch = totals.batches.setdefault(run.batch_size, [0, 0, 0, 0])
            batch[0] += 1
            batch[1] += run.input_ns
            batch[2] += run.infer_ns
            batch[3] += run.output_ns

    def record_success(self, answer: Answer, images: int, duration_ns: int) -> None:
        """A request answered from `answer` (its rows of a run) `duration_ns` after it reached the model."""
        run = answer.run
        with self._lock:
            totals = self._totals(run.version)
            totals.inference_count += images
            totals.last_inference = time.time_ns() // 1_000_000
            _add(totals.success, duration_ns)
            _add(totals.queue, answer.queued_ns)
            _add(totals.compute_input, run.input_ns)
            _add(totals.compute_infer, run.infer_ns)
            _add(totals.compute_output, run.output_ns)

    def record_failure(self, version: int, duration_ns: int) -> None:
        """A request for model version `version` that raised `duration_ns` after it reached the model."""
        with self._lock:
            _add(self._totals(version).fail, duration_ns)

    def versions(self) -> list[int]:
        """The versions with statistics, oldest first."""
        with self._lock:
            return sorted(self._versions)

    def model_statistics(self, name: str, version: int) -> ModelStatistics:
        """A snapshot of one version's totals (zeros for a version with none yet)."""
        with self._lock:
            t = self._versions.get(version) or _Totals()
            stats = InferStatistics(*(Duration(*getattr(t, f)) for f in (
                "success", "fail", "queue", "compute_input", "compute_infer", "compute_output")))
            batches = tuple(BatchStatistics(size, Duration(count, input_ns), Duration(count, infer_ns),
                                            Duration(count, output_ns))
                            for size, (count, input_ns, infer_ns, output_ns) in sorted(t.batches.items()))
            return ModelStatistics(name, str(version), t.last_inference, t.inference_count, t.execution_count,
                                   stats, batches)
