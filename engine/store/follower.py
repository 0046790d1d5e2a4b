"""A predict replica's view of the model repository: which models and versions it serves, kept up to date by polling.

Triton's poll mode (`--model-control-mode=poll`), over engine/store/repository.py's layout:

* every model folder is a model, served by its folder name; a folder that disappears is unloaded;
* a model serves the versions its config.pbtxt's version_policy names (latest N by default, N = 1);
* a new version is loaded (and checked: sha256 against meta.json, one warm-up run) before it is
  served; then the snapshot is swapped whole, so a call in flight finishes on the version it started on;
* a version that fails to load is skipped, logged, and tried again on the next poll; the versions
  already loaded stay served (with latest N, the newest N that load are served);
* a changed manifest.json or config.pbtxt reloads the model's versions; if that fails the old ones stay.

`poll()` does one pass and returns every model's `ModelState`; the caller swaps them in.
No torch, no grpc.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.manifest import Manifest
from engine.store.repository import ModelFolder, model_names, read_model
from engine.runtime import release_freed_memory, resident_bytes
from engine.store.files import describe_os_error
from proto import model_config_pb2 as mc

log = logging.getLogger(__name__)
READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # Triton's model states
UNLOADED = "unloaded"  # Triton's reason for a version it no longer serves


@dataclass(frozen=True)
class LoadedVersion:
    """A version loaded and served: its engine and what loading it cost."""
    version: int
    step: int
    created_unix: float
    engine: Any  # an InferenceEngine (whatever `open_version` returns)
    weights_bytes: int  # size of its model.onnx
    memory_bytes: int  # how much the process's resident memory grew while loading it
    fingerprint: tuple


@dataclass(frozen=True)
class VersionState:
    """One version of a model in the repository index."""
    version: int
    state: str  # READY or UNAVAILABLE
    reason: str  # why it is not READY ("" when it is)


@dataclass(frozen=True)
class ModelState:
    """One model as a replica serves it now. Replaced whole on every change, never mutated."""
    name: str
    manifest: Manifest | None  # None when the model has never loaded
    config: mc.ModelConfig | None
    served: tuple[LoadedVersion, ...]  # ascending; the last one answers calls that name no version
    index: tuple[VersionState, ...]  # every version folder, ascending
    problem: str  # why the model serves nothing ("" when it serves a version)
    fingerprint: tuple  # of manifest.json and config.pbtxt as loaded

    @property
    def latest(self) -> LoadedVersion | None:
        return self.served[-1] if self.served else None


OpenVersion = Callable[[Path, Manifest], Any]  # (model.onnx, manifest) -> engine; raises when it cannot load


class RepositoryFollower:
    def __init__(self, root: Path, open_version: OpenVersion):
        self.root = Path(root)
        self._open = open_version
        self._models: dict[str, ModelState] = {}
        self._reported: dict[tuple[str, int], str] = {}  # (model, version) -> the problem last logged

    @property
    def models(self) -> dict[str, ModelState]:
        return dict(self._models)

    def poll(self) -> dict[str, ModelState]:
        """One pass over the repository; returns the new state of every model (the old dict is never changed)."""
        names = model_names(self.root)
        models = {}
        for name in names:
            try:
                models[name] = self._follow(read_model(self.root / name), self._models.get(name))
            except OSError as e:  # the folder changed under us: keep what was served, look again next poll
                log.warning("model %s: cannot be read (%s); keeping what is served", name, describe_os_error(e))
                if name in self._models:
                    models[name] = self._models[name]
        for gone in self._models.keys() - models.keys():
            log.info("model %s left the repository: unloaded", gone)
        if self._models.keys() - models.keys():
            release_freed_memory()
        self._models = models
        return dict(models)

    def _follow(self, folder: ModelFolder, old: ModelState | None) -> ModelState:
        if folder.problem:
            self._report(folder.name, 0, folder.problem)
            if old is not None and old.served:  # keep serving what loaded before
                return old
            return ModelState(folder.name, None, None, (), (), folder.problem, folder.fingerprint)
        self._reported.pop((folder.name, 0), None)
        reload = old is None or old.fingerprint != folder.fingerprint
        kept = {} if reload or old is None else {v.version: v for v in old.served}
        present = {v.version: v for v in folder.versions}
        keep_n = folder.latest_count()
        served: list[LoadedVersion] = []
        reasons: dict[int, str] = {}
        for candidate in folder.wanted():
            if keep_n is not None and len(served) >= keep_n:
                break
            loaded = kept.get(candidate.version)
            if loaded is not None and loaded.fingerprint == candidate.fingerprint:
                served.append(loaded)
                continue
            loaded, problem = self._load(folder, candidate)
            if loaded is not None:
                served.append(loaded)
                self._reported.pop((folder.name, candidate.version), None)
                log.info("model %s version %d loaded (step %d, %.1f MB resident)", folder.name, candidate.version,
                         candidate.step, loaded.memory_bytes / 1e6)
                continue
            self._report(folder.name, candidate.version, problem)
            reasons[candidate.version] = f"failed to load: {problem}"
            if old is not None and candidate.version in kept:  # its files changed and the new ones fail: keep it
                served.append(kept[candidate.version])
        if reload and old is not None and old.served and not served:  # a changed model that fails: keep the old
            return old
        served.sort(key=lambda v: v.version)
        serving = {v.version for v in served}
        for gone in (set(kept) - serving):
            log.info("model %s version %d unloaded", folder.name, gone)
        index = tuple(VersionState(v, READY, "") if v in serving else VersionState(v, UNAVAILABLE,
                                                                                  reasons.get(v, UNLOADED))
                      for v in sorted(present))
        problem = "" if served else (f"no version of it loads ({'; '.join(f'{v}: {r}' for v, r in reasons.items())})"
                                     if reasons else "it has no version folder (<model>/1/model.onnx, ...)")
        manifest, config = folder.manifest, folder.config
        return ModelState(folder.name, manifest, config, tuple(served), index, problem, folder.fingerprint)

    def _load(self, folder: ModelFolder, version) -> tuple[LoadedVersion | None, str]:
        if version.problem:
            return None, version.problem
        try:
            problem = version.verify()
            if problem:
                return None, problem
            before = resident_bytes()
            engine = self._open(version.model, folder.manifest)
            grown = max(0, resident_bytes() - before)
        except Exception as e:  # noqa: BLE001 - whatever ONNX Runtime or the check says, in one line
            return None, describe_os_error(e)
        return LoadedVersion(version.version, version.step, version.created_unix, engine, version.model.stat().st_size,
                             grown, version.fingerprint), ""

    def _report(self, model: str, version: int, problem: str) -> None:
        """WARNING the first time (and whenever the problem changes), quietly on later polls."""
        key = (model, version)
        what = f"model {model} version {version}" if version else f"model {model}"
        if self._reported.get(key) != problem:
            log.warning("%s cannot be served: %s (tried again on every poll)", what, problem)
            self._reported[key] = problem
        else:
            log.debug("%s still cannot be served: %s", what, problem)


def poll_forever(follower: RepositoryFollower, seconds: float, stop, apply: Callable[[dict[str, ModelState]], None]):
    """Poll every `seconds` until `stop` (a threading.Event) is set, handing each pass's states to `apply`."""
    while not stop.wait(seconds):
        started = time.monotonic()
        try:
            apply(follower.poll())
        except Exception:  # noqa: BLE001 - a bad pass must not end the polling
            log.exception("polling the model repository %s failed; trying again in %.1fs", follower.root, seconds)
        log.debug("repository poll took %.3fs", time.monotonic() - started)
