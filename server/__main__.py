"""`python -m server`: start the vitserve gRPC server. Flags override VITSERVE_* variables, which override defaults."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import typing

from engine.errors import ConfigError, VitServeError
from server.app import create_server
from server.auth import Security
from server.config import SECRET_FIELDS, Settings, env_var, flag, format_default
from server.dataplane import DataPlane
from server.http import create_http_server
from server.observability import setup_logging

log = logging.getLogger("server")
FINAL_CHECKPOINT_FAILED = 3  # exit status when SIGTERM's final checkpoint cannot be written (docs/reliability.md)


def program_name(module_form: str) -> str:
    """How the user started us: the console script's name (vitserve-server), else `python -m ...`."""
    name = os.path.basename(sys.argv[0])
    return module_form if name in ("__main__.py", "-c", "") else name


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line (exit 2), like every other start-up error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv=None) -> dict:
    """The flags, one per Settings field; a flag not given is None (the environment or the default applies)."""
    p = _Parser(prog=program_name("python -m server"), description=__doc__,
                allow_abbrev=False)  # no --read-token for --read-token-file
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:  # secrets never go on the command line (ps, shell history): env or *_file only
            continue
        help_ = f"{field.description} (env {env_var(name)}; default {format_default(name)})".replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(field.annotation) is typing.Literal:  # a choice: argparse lists and checks them
            p.add_argument(flag(name), choices=typing.get_args(field.annotation), default=None, help=help_)
        else:
            p.add_argument(flag(name), type=field.annotation, default=None, help=help_)
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get to finish on SIGTERM")
    return vars(p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    grace = args.pop("grace")
    try:
        settings = Settings.from_env(**args)
        setup_logging(settings.log_level, settings.log_json)
        security = Security.from_settings(settings)  # bad TLS/token settings fail before the model loads
        plane = DataPlane(settings)
        server, port = create_server(settings, plane, security)
        http = create_http_server(settings, plane, security)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if plane.metrics.port is not None:
        print(f"vitserve metrics on http://{settings.host}:{plane.metrics.port}/metrics", flush=True)
    if http is not None:
        print(f"vitserve http on http{'s' if security.tls else ''}://{settings.host}:{http.port}", flush=True)
    print(f"vitserve listening on {settings.host}:{port}", flush=True)  # tests and scripts wait for this line

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Wait in short slices: the kernel may deliver SIGTERM to a gRPC or ONNX Runtime thread, and Python
    # only runs the handler when the main thread next executes bytecode; an untimed wait never wakes it.
    while not stop.wait(0.2):
        pass
    log.info("shutting down (grace %.1fs)", grace)
    if http is not None:
        http.stop()  # no new HTTP connections; requests in flight finish
    server.stop(grace).wait()  # no new calls; in-flight ones finish or are cancelled after `grace`
    try:
        final = plane.close()  # then the final checkpoint, so no acknowledged step is lost
    except VitServeError as e:  # e.g. the disk filled up: say so, exit with the documented status
        print(f"error: the final checkpoint could not be written: {e}", file=sys.stderr)
        return FINAL_CHECKPOINT_FAILED
    log.info("final checkpoint %s", final.name if final else "not needed (nothing changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
