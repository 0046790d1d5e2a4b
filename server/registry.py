"""The model registry: the models a server answers inference calls for, by name, and the v2 protocol's view of them.

As in MLServer and KServe, a front door decodes a request, hands the batch to the registry, and converts
the answer: Predict is `registry.predict(name, decode, k)`, ModelInfer is `registry.infer(name, version,
decode)`. Each call is timed from the decoding on, so a request that fails to decode counts as a failed
request in the statistics.

What is served depends on the role, chosen once at startup:
* `serve_artifacts`: the model of --artifacts (a trainer's own model, or a predict replica's over the trainer's
  data directory), at its newest published version; the trainer swaps in each version it publishes.
* `follow_repository`: a predict replica over --model-repository serves every model in it; a poll thread
  (engine/store/follower.py) brings new, changed and removed models and versions.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, InvalidArgument, NotFound, Unavailable, Unimplemented
from engine.store.follower import READY, UNAVAILABLE, UNLOADED, LoadedVersion, ModelState, RepositoryFollower, poll_forever
from engine.inference import InferenceEngine
from engine.manifest import INFERENCE_MODEL, Manifest
from engine.runtime import check_device, resident_bytes, session_options
from engine.store.files import VersionStore
from engine.store.triton import model_config
from proto import model_config_pb2
from proto.records.explain import AttributeResult
from proto.records.model import ModelVersion, PredictResult
from proto.records.v2 import ModelIndex, ModelStatisticsList, RepositoryIndex
from server.config import Settings
from server.metrics import Metrics
from server.models import Decode, ServedModel

log = logging.getLogger(__name__)



class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self._metrics = metrics
        check_device(settings.device)  # a device this process cannot run is a startup error
        self._options = session_options(settings.inference_threads, training=False)
        self._models: dict[str, ServedModel] = {}  # by name; replaced whole
        self._states: dict[str, ModelState] = {}  # the repository's models as last polled
        self._own: Manifest | None = None  # the model of --artifacts
        self._versions: VersionStore | None = None  # its published versions
        self._follower: RepositoryFollower | None = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._closing = False
        self._ready_watchers: list[Callable[[bool], None]] = []

    # -- what is served -------------------------------------------------------------------------------

    def serve_artifacts(self, manifest: Manifest, versions: VersionStore | None, newest: ModelVersion | None) -> None:
        """Serve the model of --artifacts at `newest` (None: the export's inference graph)."""
        self._own, self._versions = manifest, versions
        served = self._open_own_version(newest)
        self._models = {manifest.name: ServedModel(manifest.name, manifest, self.triton_config(), self.settings,
                                                   self._metrics, (served,))}

    def serve_published(self, version: ModelVersion) -> None:
        """Switch the own model to a version just published (calls in flight finish on the old one)."""
        self.model().serve((self._open_own_version(version),))

    def follow_repository(self, root: Path) -> None:
        """Serve every model of the repository; a thread polls it for new, changed and removed ones."""
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a folder")
        self._follower = RepositoryFollower(root, self._open_repository_version)
        self._apply(self._follower.poll())
        log.info("serving %d models from the model repository %s (polled every %gs): %s", len(self._models), root,
                 self.settings.repository_poll_seconds, ", ".join(self._models) or "none yet")
        self._poller = threading.Thread(target=poll_forever, name="vitserve-repository", daemon=True,
                                        args=(self._follower, self.settings.repository_poll_seconds, self._stop,
                                              self._apply))
        self._poller.start()

    def _open_own_version(self, version: ModelVersion | None) -> LoadedVersion:
        """A session on a published version of the own model (None: the export's inference graph)."""
        path = self._versions.model_path(version.version) if version else self._own.path(INFERENCE_MODEL)
        before = resident_bytes()
        engine = InferenceEngine(path, self._own.input_name, self._own.output_name, self.settings.device, self._options)
        return LoadedVersion(version.version if version else 0, version.step if version else 0,
                             version.created_unix if version else path.stat().st_mtime, engine,
                             path.stat().st_size, max(0, resident_bytes() - before), ())

    def _open_repository_version(self, path: Path, manifest: Manifest) -> InferenceEngine:
        """A session on a repository version, checked with one run of the manifest's input shape."""
        engine = InferenceEngine(path, manifest.input_name, manifest.output_name, self.settings.device, self._options)
        logits = engine.logits(np.zeros((1, *manifest.input_shape[1:]), np.float32))
        if logits.shape != (1, manifest.num_classes):
            raise InvalidArgument(f"its output has shape {list(logits.shape)} for one image, the manifest says "
                                  f"[1, {manifest.num_classes}]")
        return engine

    def _apply(self, states: dict[str, ModelState]) -> None:
        """Swap in a poll's models: same manifest and configuration -> new versions; otherwise a new ServedModel."""
        old, models = self._models, {}
        for name, state in states.items():
            if not state.served:
                continue
            current = old.get(name)
            if current is not None and current.manifest == state.manifest and current.config == state.config:
                current.serve(state.served)
                models[name] = current
            else:
                models[name] = ServedModel(name, state.manifest, state.config, self.settings, self._metrics,
                                           state.served)
        was_ready = self.ready
        self._models = models
        self._states = states
        if self.ready != was_ready:
            for watcher in self._ready_watchers:
                watcher(self.ready)
        for name, model in old.items():
            if models.get(name) is not model:
                model.close()  # requests it already queued are answered first

    def model(self, name: str = "") -> ServedModel:
        """The model served under `name`; "" is the only (or the own) one. NotFound names those served."""
        models = self._models
        if name:
            found = models.get(name)
            if found is None:
                raise self._unknown_model(name)
            return found
        if self._own is not None and self._own.name in models:
            return models[self._own.name]
        if len(models) == 1:
            return next(iter(models.values()))
        if not models:
            raise Unavailable(f"no model is loaded yet from the model repository {self.settings.model_repository}")
        raise InvalidArgument(f"this replica serves {len(models)} models ({', '.join(sorted(models))}): name one "
                              "in the request's model field")

    def _unknown_model(self, name: str) -> NotFound:
        served = ", ".join(f"'{n}'" for n in sorted(self._models)) or "no model yet"
        return NotFound(f"model '{name}' is not served here; this server serves {served}")

    def is_own(self, model: ServedModel) -> bool:
        return model.manifest is self._own

    # -- inference ------------------------------------------------------------------------------------

    def predict(self, name: str, decode: Decode, k: int = 0, return_logits: bool = False) -> PredictResult:
        """Top-k classes of a request's batch on the model's newest version (through its dynamic batcher)."""
        model = self.model(name)
        return model.prediction(model.timed_answer(decode), k, return_logits)

    def infer(self, name: str, version: str, decode: Decode) -> tuple[int, np.ndarray]:
        """(model version, logits) of a request's batch on the named version ("": the newest)."""
        answer = self.model(name).timed_answer(decode, version)
        return answer.version, answer.logits

    def attribute(self, name: str, decode: Decode, targets: list[int] | None, method: str,
                  heads: bool) -> AttributeResult:
        """Attribution maps of a request's batch on the model's newest served version (what Predict answers)."""
        model = self.model(name)
        return model.attribute(decode(model), targets, method, heads)

    # -- readiness ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Inference calls are taken: a model is served and shutdown has not begun."""
        return not self._closing and bool(self._models)

    def watch_ready(self, watcher: Callable[[bool], None]) -> None:
        """Call `watcher(ready)` now and whenever readiness changes (a replica's first model arrives, its last
        one leaves)."""
        self._ready_watchers.append(watcher)
        watcher(self.ready)

    @property
    def model_version(self) -> int:
        """The newest version the default model serves (0: the exported model; 0 too with no model)."""
        try:
            return self.model().latest.version
        except (InvalidArgument, Unavailable):
            return 0

    def model_versions(self, model: ServedModel) -> list[ModelVersion]:
        """The versions of a model: the own model's export and everything published, else those served."""
        if not self.is_own(model):
            return [ModelVersion(v.version, v.step, v.created_unix) for v in model.served]
        published = self._versions.versions() if self._versions else []
        return [ModelVersion(0, 0, self._own.path(INFERENCE_MODEL).stat().st_mtime), *published]

    def queued(self) -> int:
        """Requests waiting in the models' dynamic batchers."""
        return sum(m.batcher.pending() for m in self._models.values() if m.batcher)

    def close(self) -> None:
        """Stop the repository poll and the batchers (requests already queued are answered first)."""
        self._closing = True
        self._stop.set()
        if self._poller:
            self._poller.join()
        for model in self._models.values():
            model.close()

    # -- the v2 protocol's view of the models ---------------------------------------------------------

    def v2_model(self, name: str, version: str = "") -> tuple[ServedModel, str]:
        """The model and version a v2 call names (the name is required; version "" is the newest), or NotFound."""
        model = self.model(name) if name else None
        if model is None:
            raise self._unknown_model(name)
        return model, str(model.version(version).version)

    def triton_config(self, name: str = "") -> model_config_pb2.ModelConfig:
        """A model's Triton configuration. The own model's is what `python -m engine.store.triton` writes for it, with this
        server's batch limit, device and --repository-versions; a repository model's is its config.pbtxt."""
        if self._own is not None and name in ("", self._own.name):
            return self.artifacts_config(self._own)
        return self.model(name).config

    def artifacts_config(self, manifest: Manifest) -> model_config_pb2.ModelConfig:
        """The Triton configuration of the model of --artifacts (also what the trainer hands a model repository)."""
        return model_config(manifest, self.settings.max_batch_size, gpu=self.settings.device.startswith("cuda"),
                            num_versions=self.settings.repository_versions)

    def model_statistics(self, name: str = "", version: str = "") -> ModelStatisticsList:
        """The statistics per model and version: the versions served and every other that has statistics in this
        process (name "": every model; version "": all of its versions, oldest first)."""
        if version and not name:
            raise InvalidArgument(f"version '{version}' needs a model name")
        models = [self.model(name)] if name else [self._models[n] for n in sorted(self._models)]
        out = []
        for model in models:
            known = sorted({*(v.version for v in model.served), *model.statistics.versions()})
            if version and version not in map(str, known):
                raise NotFound(f"model '{model.name}' version '{version}' has no statistics; the versions with "
                               f"statistics are {', '.join(map(str, known))} (leave the version empty for all)")
            wanted = [int(version)] if version else known
            out.extend(model.statistics.model_statistics(model.name, v) for v in wanted)
        return ModelStatisticsList(tuple(out))

    def repository_index(self, repository_name: str = "", ready: bool = False) -> RepositoryIndex:
        """Every model's versions with Triton's states, by name: READY for those served (until shutdown begins),
        UNAVAILABLE with the reason for the others; `ready` keeps only the READY ones."""
        if repository_name:
            raise Unimplemented(f"repository_name '{repository_name}': naming a repository is not supported by "
                                "vitserve (a server has one: its model's data directory, or its --model-repository): "
                                "leave it empty")
        models = []
        if self._follower is not None:
            for name, state in sorted(self._states.items()):
                if not state.index:
                    models.append(ModelIndex(name, "", UNAVAILABLE, state.problem))
                for v in state.index:
                    models.append(ModelIndex(name, str(v.version), v.state, v.reason))
        else:
            own = self.model()
            served = own.latest.version
            for v in self.model_versions(own):
                models.append(ModelIndex(own.name, str(v.version), READY if v.version == served else UNAVAILABLE,
                                         "" if v.version == served else UNLOADED))
        if self._closing:
            models = [dataclasses.replace(m, state=UNAVAILABLE, reason="the server is shutting down")
                      if m.state == READY else m for m in models]
        return RepositoryIndex(tuple(m for m in models if m.state == READY or not ready))

