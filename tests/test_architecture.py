"""The architecture's rules, one test each: who may import whom (read from the source, not run), what importing
the engine does to a fresh interpreter, and that the repository is self-contained (no file points at a document
outside it).

    proto/   the contract: stubs, the wire records, their one converter and the one tensor codec; imports
             none of the packages below, so the server and the client share it
    model/   the torch side (define, export, verify); may use engine/, never server/
    engine/  ONNX Runtime, numpy in and out; knows neither torch nor grpc, neither model/ nor server/;
             its rooms train/ -> graph/ -> top level <- store/ import downwards only
    server/  the front doors (gRPC, KServe v2, metrics) on engine/; never torch or model/
    client/  ships without server/, engine/ and model/
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CALL_TIMEOUT, REPO, clean_env

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- (a) import rules, by AST

FORBIDDEN_IMPORTS = {  # package -> top-level modules its files must never import ("grpc_*": any grpc_ package)
    "proto": ("server", "engine", "model", "client", "torch", "torchvision", "einops", "onnx", "onnxruntime"),
    "model": ("server",),
    "server": ("torch", "torchvision", "einops", "model"),
    "engine": ("torch", "torchvision", "einops", "model", "grpc", "grpc_*", "server"),
    "client": ("server", "engine", "model"),
}


def forbidden(module: str, rules: tuple[str, ...]) -> str | None:
    """The rule that `module` (dotted) breaks, if any."""
    top = module.split(".")[0]
    for rule in rules:
        if top == rule or (rule.endswith("*") and top.startswith(rule[:-1])):
            return rule
    return None


def imported_modules(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, statement) for every import in the file: `import a.b`, `from a import b` (relative ones
    resolved against the file's package, `from . import b` giving package.b), and importlib.import_module("a")
    or __import__("a") with a literal name. Imports inside functions and `if` blocks count too."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    package = list(path.relative_to(REPO).parts[:-1])  # the folder: a module's package, or __init__'s own
    lines = source.splitlines()

    def statement(node: ast.AST) -> str:  # its first line (ast.get_source_segment splits the file at every call)
        return lines[node.lineno - 1][node.col_offset:]

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, statement(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else []  # `from ..x`: one folder up
            base = [*anchor, *(node.module.split(".") if node.module else [])]
            if base:
                found.append((node.lineno, ".".join(base), statement(node)))
            if not node.module:  # from . import x: x is a module of that package (or a top-level one)
                found += [(node.lineno, ".".join([*base, alias.name]), statement(node)) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value, statement(node)))
    return found


def python_files(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_import_rules(package):
    """model/ never imports server/; server/ never torch, torchvision, einops or model/; engine/ none of those
    nor grpc, grpc_* or server/; client/ neither server/, engine/ nor model/."""
    rules = FORBIDDEN_IMPORTS[package]
    files = python_files(package)
    assert files, f"no .py files under {package}/"
    broken, seen = [], 0
    for path in files:
        for line, module, statement in imported_modules(path):
            seen += 1
            rule = forbidden(module, rules)
            if rule:
                broken.append(f"{path.relative_to(REPO)}:{line}: {statement}  ({package}/ must not import {rule})")
    assert seen, f"found no import at all in {package}/: the scan is broken"
    assert not broken, f"{len(broken)} import(s) break the rules of {package}/:\n" + "\n".join(broken)


ENGINE_ROOMS = {  # engine/'s rooms -> the rooms they may import: the records and runtime at the top import none
    "top": set(), "store": {"top"}, "graph": {"top"}, "train": {"top", "graph"}}


def test_the_engine_rooms_import_downwards_only():
    """engine/'s top level (manifest, errors, runtime, inference) imports none of its rooms; store/ and graph/ only
    the top; train/ the top and graph/. No cycle, so each room can be read from the top down."""
    broken, seen = [], 0
    for path in python_files("engine"):
        parts = path.relative_to(REPO / "engine").parts
        room = parts[0] if len(parts) > 1 else "top"
        assert room in ENGINE_ROOMS, f"engine/{room}/ is not in ENGINE_ROOMS: say what it may import"
        for line, module, statement in imported_modules(path):
            names = module.split(".")
            if names[0] != "engine" or len(names) < 2:
                continue
            seen += 1
            target = names[1] if names[1] in ENGINE_ROOMS else "top"
            if target != room and target not in ENGINE_ROOMS[room]:
                broken.append(f"{path.relative_to(REPO)}:{line}: {statement}  (engine/{room} must not import {target})")
    assert seen > 20, "found almost no engine-internal import: the scan is broken"
    assert not broken, "\n".join(broken)


# ---------------------------------------------------------------- (b) importing engine/ in a fresh interpreter

def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ENGINE_MODULES = sorted(module_name(p) for p in python_files("engine"))  # "engine" itself first
NOT_LOADED = ("torch", "torchvision", "einops", "grpc", "grpc_*", "model", "server")

# Imports one module with a profiler that sees every call, C functions included: any call of ONNX Runtime's
# set_default_logger_severity/verbosity (under any name it was imported as) is recorded with its caller.
# An import hook records who first asked for each top-level module that must not load. Prints a JSON report.
IMPORT_ONE = """
import importlib, json, sys, threading, traceback

NOT_LOADED, LOGGER_SETTERS = sys.argv[2].split(","), {"set_default_logger_severity", "set_default_logger_verbosity"}

def must_not_load(name):
    top = name.split(".")[0]
    return any(top == rule or (rule.endswith("*") and top.startswith(rule[:-1])) for rule in NOT_LOADED)

asked = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if must_not_load(name) and name.split(".")[0] not in asked:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            asked[name.split(".")[0]] = [f"{f.filename}:{f.lineno}" for f in frames[-6:]]
        return None

calls = []
def profile(frame, event, arg):
    if event == "c_call" and getattr(arg, "__name__", "") in LOGGER_SETTERS:
        calls.append(f"{arg.__name__} called from {frame.f_code.co_filename}:{frame.f_lineno}")
    elif event == "call" and frame.f_code.co_name in LOGGER_SETTERS and frame.f_back is not None:
        back = frame.f_back
        calls.append(f"{frame.f_code.co_name} called from {back.f_code.co_filename}:{back.f_lineno}")

importlib.import_module("engine.no_ortmodule_probe")  # as the serving programs do, first
sys.meta_path.insert(0, Spy())
threading.setprofile(profile)
sys.setprofile(profile)
module = importlib.import_module(sys.argv[1])
sys.setprofile(None)
threading.setprofile(None)
loaded = sorted(m for m in sys.modules if must_not_load(m))
print(json.dumps({"file": module.__file__, "logger_calls": calls, "loaded": loaded,
                  "asked": {top: stack for top, stack in asked.items() if top in {m.split(".")[0] for m in loaded}}}))
"""

# Violations that only a change outside tests/ can fix: module -> (the NOT_LOADED rules it breaks, why). The
# test xfails while a module breaks exactly these, fails on anything else, and fails once it is fixed (then
# remove the entry).
KNOWN_VIOLATIONS: dict[str, tuple[set[str], str]] = {}


def import_in_fresh_interpreter(module: str) -> dict:
    result = subprocess.run([sys.executable, "-c", IMPORT_ONE, module, ",".join(NOT_LOADED)], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=CALL_TIMEOUT)
    assert result.returncode == 0, f"import {module} failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(REPO / "engine"), report["file"]  # this checkout's engine/
    return report


def test_importing_the_engine_package_changes_no_global_state():
    """`import engine` (and its sub-packages) sets nothing in sys.modules: the ORTModule probe is skipped only by a
    program that imports engine.no_ortmodule_probe itself."""
    script = ("import sys; before = set(sys.modules); import engine, engine.train, engine.graph, engine.store; "
              "print(' '.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=clean_env(), capture_output=True,
                            text=True, timeout=CALL_TIMEOUT)
    assert result.stdout.split() == ["engine", "engine.graph", "engine.store", "engine.train"], \
        result.stdout + result.stderr


def test_the_engine_modules_are_all_listed():
    assert {"engine", "engine.runtime", "engine.inference", "engine.train.step", "engine.store.triton"} <= set(ENGINE_MODULES)
    assert len(ENGINE_MODULES) == len(python_files("engine"))


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_importing_an_engine_module_loads_neither_torch_nor_grpc_and_leaves_ort_logging_alone(module):
    """In a fresh interpreter of this venv (where torch is installed), `import <module>` loads none of torch,
    torchvision, einops, grpc, grpc_*, model/ or server/, and never calls ONNX Runtime's
    set_default_logger_severity (nor _verbosity): the process-wide default logger is left as it was."""
    report = import_in_fresh_interpreter(module)
    calls = report["logger_calls"]
    assert calls == [], f"import {module} changed ONNX Runtime's default logger: {calls}"
    broken = {forbidden(m, NOT_LOADED) for m in report["loaded"]}
    why = "\n".join(f"{top} first asked for at:\n    " + "\n    ".join(stack) for top, stack in report["asked"].items())
    known, reason = KNOWN_VIOLATIONS.get(module, (set(), ""))
    if known:
        assert broken, f"import {module} no longer loads {sorted(known)}: remove it from KNOWN_VIOLATIONS"
        if broken == known:
            pytest.xfail(reason)
    assert not broken, f"import {module} loaded {report['loaded']}\n{why}"


# ---------------------------------------------------------------- (c) a self-contained repository

OUTSIDE_DOCUMENTS = ("DESIGN" + ".md", ".." + "/shared")  # spelled apart so that this file does not match


def test_no_file_refers_to_a_document_outside_the_repository():
    """No tracked (or new, not ignored) file names the OUTSIDE_DOCUMENTS (a design document and a shared folder
    beside the checkout): a reader of the repository cannot open them. Its own design notes are docs/design.md."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, timeout=60)
    assert listing.returncode == 0, f"git ls-files failed in {REPO}: {listing.stderr.decode(errors='replace')}"
    names = sorted({os.fsdecode(n) for n in listing.stdout.split(b"\0") if n})
    assert "README.md" in names and "tests/test_architecture.py" in names, names[:20]  # the scan covers them
    hits = []
    for name in names:
        path = REPO / name
        if not path.is_file():  # deleted in the work tree
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            for document in OUTSIDE_DOCUMENTS:
                if document.encode() in line:
                    hits.append(f"{name}:{number}: {line.decode(errors='replace').strip()[:160]}")
    assert not hits, "files refer to documents outside the repository:\n" + "\n".join(hits)
