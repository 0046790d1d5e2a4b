"""`python -m server`: start the vitserve gRPC server. Flags override VITSERVE_* variables, which override defaults.

With --data-parallel (under `mpiexec --with-ft ulfm -n W`) rank 0 is this server and ranks >= 1 run the
data-parallel worker loop of engine/train/parallel.py instead: no gRPC, HTTP or metrics, only a training engine.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import typing

import engine.no_ortmodule_probe  # noqa: F401 - first: see its docstring
from engine.errors import ConfigError, VitServeError
from server.app import create_server
from server.auth import Security
from server.config import SECRET_FIELDS, Settings, env_var, flag, format_default
from server.dataplane import DataPlane
from server.http import create_http_server
from server.observability import setup_logging

log = logging.getLogger("server")
FINAL_CHECKPOINT_FAILED = 3  # exit status when SIGTERM's final checkpoint cannot be written (docs/reliability.md)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Open MPI's mpiexec meets SIGTERM by killing every rank a moment later; it forwards SIGUSR1 and lets the job
# end on its own, so `kill -USR1 <mpiexec>` stops a data-parallel job gracefully (as SIGTERM to rank 0 does).
DATA_PARALLEL_STOP_SIGNALS = (signal.SIGUSR1,)


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


def join_job(settings: Settings):
    """With --data-parallel: this process's place in the MPI job (engine/train/parallel.py imports mpi4py only then)."""
    if settings.role == "predict":
        raise ConfigError("--data-parallel trains: use it with --role all or train, not predict")
    from engine.train.parallel import join

    return join()


def run_worker(settings: Settings, group) -> int:
    """A rank >= 1 of a data-parallel job: a training engine on the artifacts, driven by rank 0 until it says stop.

    The stop signals (mpiexec forwards them to every rank) are left to rank 0, which writes the final
    checkpoint and then stops the workers."""
    from engine.train import parallel
    from engine.manifest import Manifest
    from engine.runtime import quiet_default_logger, session_options
    from engine.train.step import TrainingEngine

    for sig in STOP_SIGNALS + DATA_PARALLEL_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    engine, error = None, ""
    try:
        quiet_default_logger()
        engine = TrainingEngine(Manifest.load(settings.artifacts), settings.trainer_device,
                                session_options(settings.training_threads, training=True),
                                settings.learning_rate, trainer=settings.trainer)
    except (ConfigError, RuntimeError) as e:  # rank 0 says it and stops the job
        error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return parallel.run_worker(group, engine, error, settings.checksum_every_steps)


def main(argv=None) -> int:
    args = parse_args(argv)
    grace = args.pop("grace")
    group = None  # the MPI job with --data-parallel
    try:
        settings = Settings.from_env(**args)
        setup_logging(settings.log_level, settings.log_json)
        if settings.data_parallel:
            group = join_job(settings)
            if group.rank > 0:
                return run_worker(settings, group)
        security = Security.from_settings(settings)  # bad TLS/token settings fail before the model loads
        plane = DataPlane(settings)
        server, port = create_server(settings, plane, security)
        http = create_http_server(settings, plane, security)
    except ConfigError as e:
        if group is not None:
            group.stop_workers(2)
        else:
            from engine.train.parallel import launched_rank

            if launched_rank() > 0:
                return 2  # every rank of the job found the same problem: rank 0 says it
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        status = serve(settings, plane, server, port, http, security, grace)
    finally:
        if group is not None:  # after the final checkpoint: every worker exits with the job
            group.stop_workers(0)
    if group is not None and group.lost and status == 0:  # the job lost a rank: say so to whatever restarts it
        from engine.train.parallel import RANK_LOST

        return RANK_LOST
    return status


def serve(settings: Settings, plane: DataPlane, server, port: int, http, security: Security, grace: float) -> int:
    """Announce the server, wait for SIGTERM or SIGINT, then stop gracefully; returns the exit status."""
    if plane.metrics.port is not None:
        print(f"vitserve metrics on http://{settings.host}:{plane.metrics.port}/metrics", flush=True)
    if http is not None:
        print(f"vitserve http on http{'s' if security.tls else ''}://{settings.host}:{http.port}", flush=True)
    print(f"vitserve listening on {settings.host}:{port}", flush=True)  # tests and scripts wait for this line

    stop = threading.Event()
    for sig in STOP_SIGNALS + (DATA_PARALLEL_STOP_SIGNALS if settings.data_parallel else ()):
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
