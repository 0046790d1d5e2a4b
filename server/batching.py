"""Server-side dynamic batching for Predict: concurrent requests coalesced into one ONNX Runtime run.

Callers block in `submit(images)`; one worker thread takes the oldest request,
gathers whatever else is queued (waiting at most `max_delay_s` for more) up to
`max_batch` rows, runs them as one batch, and hands each caller exactly its own
rows back. Under load the queue fills while a batch runs, so batches grow with
concurrency; a lone request waits at most `max_delay_s`.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Callable

import numpy as np

# run(images) -> (model_version, logits): one engine (and version) per batch
Runner = Callable[[np.ndarray], tuple[int, np.ndarray]]


class DynamicBatcher:
    def __init__(self, run: Runner, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int], None] | None = None):
        self._run = run
        self._on_batch = on_batch  # called with the rows of every executed batch (metrics)
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._queue: queue.SimpleQueue[tuple[np.ndarray, Future] | None] = queue.SimpleQueue()
        self.batch_sizes: Counter[int] = Counter()  # rows per executed batch -> count
        self._worker = threading.Thread(target=self._loop, name="vitserve-batcher", daemon=True)
        self._worker.start()

    def submit(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        """Block until this request's rows are computed; returns (model_version, logits rows)."""
        future: Future = Future()
        self._queue.put((images, future))
        return future.result()

    def pending(self) -> int:
        """Requests waiting for a batch (not counting the batch running)."""
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()

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

    def _execute(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        try:
            images = batch[0][0] if len(batch) == 1 else np.concatenate([images for images, _ in batch])
            version, logits = self._run(images)
        except BaseException as e:  # every caller of this batch gets the error; the worker lives on
            for _, future in batch:
                future.set_exception(e)
            return
        self.batch_sizes[len(images)] += 1
        if self._on_batch:
            self._on_batch(len(images))
        start = 0
        for images, future in batch:
            future.set_result((version, logits[start:start + len(images)]))
            start += len(images)
