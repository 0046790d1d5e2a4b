"""The data directory: checkpoints and published inference models, written atomically.

    <data_dir>/<model name>/checkpoints/<name>/{checkpoint, meta.json}
    <data_dir>/<model name>/models/v000001/{inference.onnx, meta.json}

Every entry is a directory built under a temporary name and renamed into place
(rename is atomic on POSIX), after its files were fsync'ed, so a crash leaves either
the old entry or the new one, never a half-written one. Replacing an existing
entry moves the old one aside first; `recover()` at startup puts it back if the
crash came between the two renames, and removes unfinished temporaries.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from engine.errors import InvalidArgument, NotFound

META = "meta.json"
CHECKPOINT_FILE = "checkpoint"
MODEL_FILE = "inference.onnx"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TMP, _OLD = ".tmp-", ".old-"


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicDirs:
    """Entries (directories with a meta.json) under `root`, created and replaced atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.recover()

    def recover(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith(_OLD):
                name = path.name[len(_OLD):].rsplit("-", 1)[0]
                if (self.root / name).exists():
                    shutil.rmtree(path)
                else:  # crashed between moving the old entry aside and renaming the new one in
                    path.rename(self.root / name)
            elif path.name.startswith(_TMP):
                shutil.rmtree(path)

    @contextlib.contextmanager
    def write(self, name: str, meta_file: bool = True) -> Iterator[tuple[Path, dict]]:
        """Yield (empty folder, meta dict) to fill; on success the folder becomes `root/name`, replacing any
        entry of that name. With meta_file=False no meta.json is added (folders laid out for another tool)."""
        tmp = self.root / f"{_TMP}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta: dict = {}
            yield tmp, meta
            if meta_file:
                meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
                (tmp / META).write_text(json.dumps(meta))
            for path in sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)):  # files and subfolders, deepest first
                fsync_path(path)
            fsync_path(tmp)
            final = self.root / name
            old = self.root / f"{_OLD}{name}-{uuid.uuid4().hex[:8]}"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            fsync_path(self.root)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def entries(self) -> list[dict]:
        """Meta of every complete entry, oldest first."""
        metas = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not (path / META).is_file():
                continue
            metas.append(json.loads((path / META).read_text()))
        return sorted(metas, key=lambda m: (m["created_unix"], m.get("step", 0)))

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    created_unix: float
    size_bytes: int
    reason: str  # manual | auto | shutdown


@dataclass(frozen=True)
class CheckpointList:
    """The complete checkpoints, oldest first, and the newest one's name ("" when there is none)."""
    checkpoints: tuple[CheckpointInfo, ...]

    @property
    def latest(self) -> str:
        return self.checkpoints[-1].name if self.checkpoints else ""


def checkpoint_name(name: str) -> str:
    """Client-given names are names, never paths."""
    if not NAME.fullmatch(name):
        raise InvalidArgument(f"checkpoint name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


class CheckpointStore:
    def __init__(self, root: Path, artifacts_sha: str, keep_auto: int):
        self._dirs = AtomicDirs(root)
        self._artifacts_sha = artifacts_sha  # a checkpoint only fits the training graph it was made with
        self._keep_auto = keep_auto

    def save(self, name: str, reason: str, write) -> CheckpointInfo:
        """`write(path) -> step` writes the checkpoint file; the entry appears whole or not at all."""
        checkpoint_name(name)
        with self._dirs.write(name) as (folder, meta):
            step = write(folder / CHECKPOINT_FILE)
            meta.update(name=name, step=step, created_unix=time.time(), reason=reason,
                        artifacts_sha=self._artifacts_sha)
        if reason != "manual":
            self._prune()
        return self.get(name)

    def _prune(self) -> None:
        """Keep the newest `keep_auto` automatic (auto and shutdown) checkpoints; manual ones stay."""
        automatic = [m for m in self._dirs.entries() if m["reason"] != "manual"]
        for meta in automatic[:max(0, len(automatic) - self._keep_auto)]:
            self._dirs.remove(meta["name"])

    def list(self) -> list[CheckpointInfo]:
        return [self._info(m) for m in self._dirs.entries()]

    def get(self, name: str) -> CheckpointInfo:
        checkpoint_name(name)
        for info in self.list():
            if info.name == name:
                return info
        raise NotFound(f"no checkpoint named {name!r} (ListCheckpoints shows the saved ones)")

    def latest(self) -> CheckpointInfo | None:
        entries = self.list()
        return entries[-1] if entries else None

    def path(self, info: CheckpointInfo) -> Path:
        """The checkpoint file of a complete entry (from `get` or `list`) made from these artifacts."""
        meta = json.loads((self._dirs.root / info.name / META).read_text())
        if meta["artifacts_sha"] != self._artifacts_sha:
            raise InvalidArgument(f"checkpoint {info.name!r} was made from other training artifacts")
        return self._dirs.root / info.name / CHECKPOINT_FILE

    @staticmethod
    def _info(meta: dict) -> CheckpointInfo:
        return CheckpointInfo(meta["name"], meta["step"], meta["created_unix"], meta["size_bytes"], meta["reason"])


@dataclass(frozen=True)
class ModelVersion:
    version: int
    step: int
    created_unix: float


class VersionStore:
    """Published inference models, v000001 upwards. Version 0 is the export's inference.onnx (not stored here)."""

    def __init__(self, root: Path):
        self._dirs = AtomicDirs(root)

    def versions(self) -> list[ModelVersion]:
        return [ModelVersion(m["version"], m["step"], m["created_unix"]) for m in self._dirs.entries()]

    def publish(self, write) -> ModelVersion:
        """`write(path) -> step` writes the inference model; returns the new version."""
        version = max((v.version for v in self.versions()), default=0) + 1
        with self._dirs.write(f"v{version:06d}") as (folder, meta):
            step = write(folder / MODEL_FILE)
            meta.update(version=version, step=step, created_unix=time.time())
        return ModelVersion(version, step, meta["created_unix"])

    def model_path(self, version: int) -> Path:
        return self._dirs.root / f"v{version:06d}" / MODEL_FILE
