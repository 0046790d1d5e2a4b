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
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from engine.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from engine.manifest import sha256
from proto.records.model import ModelVersion
from proto.records.training import CheckpointInfo

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class Entry:
    """One entry of an AtomicDirs folder as listed: its meta (None when unreadable) and what is wrong ("" if nothing)."""
    name: str
    meta: dict | None
    problem: str


class AtomicDirs:
    """Entries (directories with a meta.json) under `root`, created and replaced atomically, checked when read.

    Each entry's meta.json records the size and sha256 of every other file in it, written before the
    rename that publishes the entry. `entries()` checks what is cheap (meta readable, files present with
    their sizes); `verify(name)` checks everything (the sha256s too). A damaged entry can be moved aside
    into `quarantine` (a folder outside `root`), so it is never loaded and never silently deleted.
    """

    def __init__(self, root: Path, quarantine: Path | None = None, required: tuple[str, ...] = ()):
        self.root = root
        self.quarantine_root = quarantine
        self._required = required  # files an entry needs when its meta predates the checksums
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
                files = sorted(p for p in tmp.iterdir() if p.is_file())
                meta["size_bytes"] = sum(p.stat().st_size for p in files)
                meta["files"] = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
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

    def entries(self) -> list[Entry]:
        """Every entry, damaged ones included (never raises for a bad entry), oldest first."""
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            meta, problem = self._read_meta(path)
            if meta is not None:
                problem = self._files_problem(path, meta, deep=False)
            found.append(Entry(path.name, meta, problem))

        def order(e: Entry):
            meta = e.meta or {}
            return (meta.get("created_unix", (self.root / e.name).stat().st_mtime), meta.get("step", 0), e.name)
        return sorted(found, key=order)

    def verify(self, name: str) -> str:
        """What is wrong with entry `name`, every file's size and sha256 checked ("" when intact)."""
        path = self.root / name
        meta, problem = self._read_meta(path)
        return problem if meta is None else self._files_problem(path, meta, deep=True)

    def quarantine(self, name: str) -> Path:
        """Move entry `name` aside (durably) into the quarantine folder; returns where it went."""
        assert self.quarantine_root is not None, "this store has no quarantine folder"
        self.quarantine_root.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_root / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        (self.root / name).rename(target)
        fsync_path(self.quarantine_root)
        fsync_path(self.root)
        return target

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    @staticmethod
    def _read_meta(path: Path) -> tuple[dict | None, str]:
        if not (path / META).is_file():
            return None, f"{META} is missing"
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"{META} cannot be read ({describe_os_error(e)})"
        if not isinstance(meta, dict):
            return None, f"{META} is not a JSON object"
        return meta, ""

    def _files_problem(self, path: Path, meta: dict, deep: bool) -> str:
        files = meta.get("files")
        if files is None:  # written before entries carried checksums: only presence can be checked
            files = {name: None for name in self._required}
        if not isinstance(files, dict):
            return f"{META} has no valid 'files' record"
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if expected is None:
                continue
            size = file.stat().st_size
            if size != expected.get("size"):
                return f"{name} has {size} bytes, {expected.get('size')} were written"
            if deep and sha256(file) != expected.get("sha256"):
                return f"{name} does not match the sha256 written with it (its bytes changed)"
        return ""


ORT_OS_ERROR = re.compile(r"error:\s*(?P<reason>[^\n]*?)\s+errno:(?P<errno>\d+)")  # how ORT reports a failed write


def os_errno(error: BaseException) -> int | None:
    """The errno of an OSError, or of the OS failure ONNX Runtime reports inside its own error message."""
    if isinstance(error, OSError):
        return error.errno
    found = ORT_OS_ERROR.search(str(error))
    return int(found["errno"]) if found else None


def describe_os_error(error: BaseException) -> str:
    """One line for an OS, ONNX Runtime or decode error, without Python reprs or ORT's source locations."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    found = ORT_OS_ERROR.search(text)
    if found:
        return found["reason"]
    line = text.splitlines()[0] if text else type(error).__name__
    return line.rsplit(" : ", 1)[-1].strip() if "[ONNXRuntimeError]" in line else line


def checkpoint_name(name: str) -> str:
    """Client-given names are names, never paths."""
    if not NAME.fullmatch(name):
        raise InvalidArgument(f"checkpoint name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


class CheckpointStore:
    def __init__(self, root: Path, artifacts_sha: str, keep_auto: int, quarantine: Path | None = None):
        self._dirs = AtomicDirs(root, quarantine, required=(CHECKPOINT_FILE,))
        self._artifacts_sha = artifacts_sha  # a checkpoint only fits the training graph it was made with
        self._keep_auto = keep_auto

    @property
    def root(self) -> Path:
        return self._dirs.root

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
        """Keep the newest `keep_auto` automatic (auto and shutdown) checkpoints; manual and damaged ones stay."""
        automatic = [e for e in self._dirs.entries() if not e.problem and e.meta.get("reason") != "manual"]
        for entry in automatic[:max(0, len(automatic) - self._keep_auto)]:
            self._dirs.remove(entry.name)

    def list(self) -> list[CheckpointInfo]:
        return [self._info(e) for e in self._dirs.entries()]

    def get(self, name: str) -> CheckpointInfo:
        checkpoint_name(name)
        for info in self.list():
            if info.name == name:
                return info
        raise NotFound(f"no checkpoint named {name!r} (ListCheckpoints shows the saved ones)")

    def path(self, info: CheckpointInfo) -> Path:
        """The checkpoint file of an entry made from these artifacts, checked byte for byte first."""
        problem = info.problem or self._dirs.verify(info.name)
        if problem:
            raise FailedPrecondition(f"checkpoint {info.name!r} is damaged: {problem}; nothing was restored")
        return self._file(info)

    def _file(self, info: CheckpointInfo) -> Path:
        """The checkpoint file of a verified entry; InvalidArgument when other training artifacts made it."""
        meta = json.loads((self._dirs.root / info.name / META).read_text())
        if meta.get("artifacts_sha") != self._artifacts_sha:
            raise InvalidArgument(f"checkpoint {info.name!r} was made from other training artifacts")
        return self._dirs.root / info.name / CHECKPOINT_FILE

    def resume_candidates(self) -> Iterator[tuple[CheckpointInfo, Path]]:
        """Newest first, every checkpoint that verifies, with its file; damaged ones are quarantined on the way
        (`quarantine(name, problem)` is the caller's to call for a checkpoint it then fails to load)."""
        for info in reversed(self.list()):
            problem = info.problem or self._dirs.verify(info.name)  # every file's sha256 read once
            if problem:
                self.quarantine(info.name, problem)
                continue
            yield info, self._file(info)

    def quarantine(self, name: str, problem: str) -> Path:
        target = self._dirs.quarantine(name)
        log.warning("checkpoint %s is damaged (%s): moved aside to %s", name, problem, target)
        return target

    def _info(self, e: Entry) -> CheckpointInfo:
        meta = e.meta or {}
        try:
            return CheckpointInfo(str(meta.get("name", e.name)), int(meta.get("step", 0)),
                                  float(meta.get("created_unix", 0.0)), int(meta.get("size_bytes", 0)),
                                  str(meta.get("reason", "")), e.problem)
        except (TypeError, ValueError):
            return CheckpointInfo(e.name, 0, 0.0, 0, "", f"{META} has fields of the wrong type")


class VersionStore:
    """Published inference models, v000001 upwards. Version 0 is the export's inference.onnx (not stored here)."""

    def __init__(self, root: Path, quarantine: Path | None = None):
        self._dirs = AtomicDirs(root, quarantine, required=(MODEL_FILE,))

    @property
    def root(self) -> Path:
        return self._dirs.root

    def versions(self) -> list[ModelVersion]:
        """The intact versions, oldest first."""
        out = []
        for e in self._dirs.entries():
            if not e.problem:
                try:
                    out.append(ModelVersion(int(e.meta["version"]), int(e.meta["step"]), float(e.meta["created_unix"])))
                except (KeyError, TypeError, ValueError):
                    continue
        return out

    def newest_intact(self) -> ModelVersion | None:
        """The newest version that verifies byte for byte; damaged ones are quarantined on the way."""
        intact = {f"v{v.version:06d}": v for v in self.versions()}  # listed once, not once per entry
        for e in reversed(self._dirs.entries()):
            problem = e.problem or self._dirs.verify(e.name)
            version = intact.get(e.name)
            if not problem and version is not None:
                return version
            target = self._dirs.quarantine(e.name)
            log.warning("model version %s is damaged (%s): moved aside to %s", e.name,
                        problem or f"{META} has no valid version record", target)
        return None

    def publish(self, write, after: int = 0) -> ModelVersion:
        """`write(path) -> step` writes the inference model; returns the new version, numbered after every version
        here and after `after` (a model repository's newest, so a fleet never sees a version number go back)."""
        names = [e.name for e in self._dirs.entries()]
        version = max((int(n[1:]) for n in names if re.fullmatch(r"v\d{6}", n)), default=0) + 1
        version = max(version, after + 1)
        with self._dirs.write(f"v{version:06d}") as (folder, meta):
            step = write(folder / MODEL_FILE)
            meta.update(version=version, step=step, created_unix=time.time())
        return ModelVersion(version, step, meta["created_unix"])

    def model_path(self, version: int) -> Path:
        return self._dirs.root / f"v{version:06d}" / MODEL_FILE


def check_writable(folder: Path) -> None:
    """`folder` exists or can be made, is a folder, and a file can be written, fsynced and removed in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"data directory {folder} is not a directory") from None
    except OSError as e:
        raise ConfigError(f"data directory {folder} cannot be created: {describe_os_error(e)}") from None
    if not folder.is_dir():
        raise ConfigError(f"data directory {folder} is not a directory")
    probe = folder / f"{_TMP}probe-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"vitserve")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"data directory {folder} is not writable: {describe_os_error(e)}") from None
