"""Server-side dynamic batching for Predict: concurrent requests coalesced into one ONNX Runtime run.

Callers block in `answer(images)`; one worker thread takes the oldest request,
gathers whatever else is queued (waiting at most `max_delay_s` for more) up to
`max_batch` rows, runs them as one batch, and hands each caller exactly its own
rows back. Under load the queue fills while a batch runs, so batches grow with
concurrency; a lone request waits at most `max_delay_s`.

Every run is timed (`Run`: preparing the input, the run itself, handing out the
rows) and every caller learns how long it queued (`Answer`): the data plane's
statistics (server/statistics.py) are made of these. `execute` is the one timed
run, for the batcher and for the data plane when batching is off.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

# run(images) -> (model_version, logits): one engine (and version) per batch
Runner = Callable[[np.ndarray], tuple[int, np.ndarray]]


@dataclass(frozen=True)
class Run:
    """One successful run of a batch and where its time went (nanoseconds, time.perf_counter_ns)."""
    version: int  # the model version that ran it
    batch_size: int  # images in the batch (the rows of all its requests)
    started_ns: int  # when the batch left the queue
    input_ns: int  # preparing the input: concatenating the requests' images
    infer_ns: int  # the run (ONNX Runtime)
    output_ns: int  # handing out the output: each request's rows


@dataclass(frozen=True)
class Answer:
    """One request's rows of a run, and how long the request waited in the queue for it."""
    logits: np.ndarray
    run: Run
    queued_ns: int

    @property
    def version(self) -> int:
        return self.run.version


def execute(run: Runner, requests: list[np.ndarray]) -> tuple[Run, list[np.ndarray]]:
    """Run the requests' images as one batch, timed; returns the run and each request's logits rows."""
    started = time.perf_counter_ns()
    images = requests[0] if len(requests) == 1 else np.concatenate(requests)
    prepared = time.perf_counter_ns()
    version, logits = run(images)
    computed = time.perf_counter_ns()
    rows, start = [], 0
    for request in requests:
        rows.append(logits[start:start + len(request)])
        start += len(request)
    done = time.perf_counter_ns()
    return Run(version, len(images), started, prepared - started, computed - prepared, done - computed), rows


class DynamicBatcher:
    def __init__(self, run: Runner, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[Run], None] | None = None):
        self._run = run
        self._on_batch = on_batch  # called with every successful run, before its callers get their rows
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        # (images, future, when it was queued (perf_counter_ns)), or None to stop
        self._queue: queue.SimpleQueue[tuple[np.ndarray, Future, int] | None] = queue.SimpleQueue()
        self.batch_sizes: Counter[int] = Counter()  # rows per executed batch -> count
        self._worker = threading.Thread(target=self._loop, name="vitserve-batcher", daemon=True)
        self._worker.start()

    def answer(self, images: np.ndarray) -> Answer:
        """Block until this request's rows are computed; returns them with their run and time in the queue."""
        future: Future = Future()
        self._queue.put((images, future, time.perf_counter_ns()))
        return future.result()

    def pending(self) -> int:
        """Requests waiting for a batch (not counting the batch running)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Answer what is queued, then stop; a request that raced in behind the stop is run on its own."""
        self._queue.put(None)
        self._worker.join()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._execute([item])

    def _gather(self, first) -> tuple[list, object]:
        """The first request plus queued ones up to max_batch rows; returns (batch, a request that did not fit)."""
        batch, rows = [first], len(first[0])
        deadline = time.monotonic() + self._max_delay
        while rows < self._max_batch:
            try:
                timeout = deadline - time.monotonic()
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None or rows + len(item[0]) > self._max_batch:
                return batch, item  # the next batch starts with it (or the loop stops)
            batch.append(item)
            rows += len(item[0])
        return batch, False

    def _loop(self) -> None:
        carry = False
        while True:
            item = carry if carry is not False else self._queue.get()
            if item is None:
                return
            batch, carry = self._gather(item)
            self._execute(batch)

    def _execute(self, batch: list[tuple[np.ndarray, Future, int]]) -> None:
        try:
            run, rows = execute(self._run, [images for images, _, _ in batch])
            self.batch_sizes[run.batch_size] += 1
            if self._on_batch:
                self._on_batch(run)
        except BaseException as e:  # every caller of this batch gets the error; the worker lives on
            for _, future, _ in batch:
                future.set_exception(e)
            return
        for (_, future, queued), logits in zip(batch, rows):
            future.set_result(Answer(logits, run, run.started_ns - queued))
