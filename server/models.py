"""The models a server answers inference calls for, by name: each with its decoder, batcher, statistics and versions.

A trainer (or an `all` server) serves one model, its own; a predict replica over a model repository
serves every model in it (engine/store/follower.py keeps their versions). Either way a `ServedModel` holds
what an inference call needs: the manifest and the validator built from it, the Triton configuration,
the dynamic batcher (one per model: a batch never mixes models), the v2 statistics, and the versions
being served as one tuple that is replaced whole (a call reads it once, so a switch never fails or
mixes a call in flight). A call that names no version runs on the newest.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from engine.errors import NotFound, Unavailable
from engine.graph.attribution import AttributionEngine, export_weights, published_weights
from engine.store.follower import LoadedVersion
from engine.inference import top_k
from engine.manifest import Manifest
from proto import model_config_pb2
from proto.records.explain import AttributeResult
from proto.records.model import PredictResult
from server.batching import Answer, DynamicBatcher, Run, execute
from server.config import Settings
from server.decode import BatchValidator
from server.metrics import Metrics
from server.statistics import Statistics

DEFAULT_TOP_K = 5
Decode = Callable[["ServedModel"], np.ndarray]  # a request's images, validated against the model it goes to


class ServedModel:
    def __init__(self, name: str, manifest: Manifest, config: model_config_pb2.ModelConfig, settings: Settings,
                 metrics: Metrics, versions: tuple[LoadedVersion, ...] = ()):
        self.name, self.manifest, self.config = name, manifest, config
        self.decoder = BatchValidator(manifest.input_shape, manifest.num_classes, settings.max_batch_size,
                                      manifest.preprocessing)
        self.statistics = Statistics()
        self._metrics = metrics
        self._served: tuple[LoadedVersion, ...] = ()
        self.serve(versions)
        self.batcher = DynamicBatcher(self._run_latest, settings.max_dynamic_batch, settings.max_batch_delay_ms / 1000,
                                      on_batch=self._batched) if settings.dynamic_batching else None
        self._device = settings.device
        self._attribution_lock = threading.Lock()
        self._attribution: AttributionEngine | None = None  # opened on the first Attribute
        self._attribution_weights: tuple[int, dict[str, np.ndarray]] | None = None  # (version, its weights)

    # -- versions -------------------------------------------------------------------------------------

    def serve(self, versions: tuple[LoadedVersion, ...]) -> None:
        """Serve exactly `versions` (ascending) from now on; the memory gauges follow."""
        old, self._served = self._served, tuple(sorted(versions, key=lambda v: v.version))
        for v in old:
            if v not in self._served:
                self._metrics.forget_model_version(self.name, v.version)
        for v in self._served:
            self._metrics.model_version_loaded(self.name, v.version, v.weights_bytes, v.memory_bytes)

    @property
    def served(self) -> tuple[LoadedVersion, ...]:
        return self._served

    @property
    def latest(self) -> LoadedVersion:
        served = self._served
        if not served:
            raise Unavailable(f"model '{self.name}' has no version loaded")
        return served[-1]

    def version(self, version: str) -> LoadedVersion:
        """The version named ("" for the newest served), or NotFound naming the versions served."""
        served = self._served
        if version in ("", None):
            return self.latest
        for v in served:
            if str(v.version) == version:
                return v
        if len(served) == 1:
            raise NotFound(f"model '{self.name}' version '{version}' is not served; the version being served is "
                           f"{served[0].version} (leave the version empty for it)")
        names = ", ".join(str(v.version) for v in served) or "none"
        raise NotFound(f"model '{self.name}' version '{version}' is not served; the versions being served are "
                       f"{names} (leave the version empty for the newest)")

    # -- running --------------------------------------------------------------------------------------

    def _run_latest(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        v = self.latest  # one read: a concurrent switch cannot mix versions
        return v.version, v.engine.logits(images)

    def _batched(self, run: Run) -> None:
        self._metrics.batch_size.observe(run.batch_size)
        self.statistics.record_run(run)

    def answer(self, images: np.ndarray, version: str = "") -> Answer:
        """This batch's logits: through the dynamic batcher for the newest version, else run alone (timed)."""
        if self.batcher and not version:
            return self.batcher.answer(images)
        chosen = self.version(version)
        run, (logits,) = execute(lambda x: (chosen.version, chosen.engine.logits(x)), [images])
        self.statistics.record_run(run)
        return Answer(logits, run, 0)

    def timed_answer(self, decode: Decode, version: str = "") -> Answer:
        """A request decoded against this model (`decode`) and answered (through the batcher for the newest version),
        timed from decoding on for the v2 statistics: a request that raises counts as a failed request of the
        newest version served."""
        start = time.perf_counter_ns()
        try:
            images = decode(self)
            answer = self.answer(images, version)
        except BaseException:
            self.statistics.record_failure(self._served[-1].version if self._served else 0,
                                           time.perf_counter_ns() - start)
            raise
        self.statistics.record_success(answer, len(images), time.perf_counter_ns() - start)
        return answer

    def prediction(self, answer: Answer, k: int = 0, return_logits: bool = False) -> PredictResult:
        """Top-k classes (and the logits when asked for) of an answer's logits."""
        k = min(k or DEFAULT_TOP_K, self.manifest.num_classes)
        indices, probs = top_k(answer.logits, k)
        return PredictResult.of(indices, probs, self.manifest.class_names, answer.logits if return_logits else None,
                                answer.version)

    def attribute(self, images: np.ndarray, targets: list[int] | None, method: str, heads: bool) -> AttributeResult:
        """Attribution maps of the newest served version (engine/graph/attribution.py): the export's attribution graph
        with that version's weights (version 0: the export's; a published one: its initializers, by name)."""
        version = self.latest
        with self._attribution_lock:
            if self._attribution is None:
                self._attribution = AttributionEngine(self.manifest, self._device)
            if self._attribution_weights is None or self._attribution_weights[0] != version.version:
                weights = (export_weights(self.manifest) if version.version == 0
                           else published_weights(self.manifest, version.engine.path))
                self._attribution_weights = (version.version, weights)
            engine, weights = self._attribution, self._attribution_weights[1]
        record = engine.record
        return AttributeResult(engine.attribute(images, targets, method, heads, weights), method, version.version, 0,
                               tuple(record.grid), tuple(record.patch))

    def close(self) -> None:
        """Stop the batcher (requests already queued are answered first) and forget the gauges. The versions stay:
        a call that found this model before it was dropped still runs."""
        batcher, self.batcher = self.batcher, None
        if batcher:
            batcher.close()
        for v in self._served:
            self._metrics.forget_model_version(self.name, v.version)

