"""A bounded load test on 127.0.0.1: many Predict clients plus one training client against a real server process.

    python -m bench.loadtest [--artifacts artifacts/digits] [--seconds 30] [--clients 8]     (make loadtest)
    python -m bench.loadtest --seconds 240 --clients 4 --train-batch 32 --publish-every-steps 20 \
        --max-rss-growth 0.05                                                                 (make soak)

Reports calls, errors, Predict latency p50/p99, publishes, and the server's memory (RSS) over the
run: growth between the second and the last fifth (the first fifth is warm-up: arenas and caches
fill). Exit status 0 only with zero errors, at least one train step and RSS growth under
--max-rss-growth. The request loops stop by themselves.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from client import ClientError, ViTClient
from examples.demo import stop_server, wait_until_listening


@dataclass
class LoadReport:
    seconds: float
    predict_calls: int
    train_steps: int
    errors: list[str]
    predict_p50_ms: float
    predict_p99_ms: float
    rss_first_mb: float  # mean of the second fifth of the samples
    rss_last_mb: float  # mean of the last fifth
    rss_fifths_mb: list[float]  # the mean of each fifth, in order
    publishes: int

    @property
    def rss_growth(self) -> float:
        return self.rss_last_mb / self.rss_first_mb - 1.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_load(address: str, pid: int, seconds: float, clients: int = 8, warmup: float = 2.0,
             train_batch: int = 16) -> LoadReport:
    """Drive the server for warmup + seconds; memory is compared over the measured part only."""
    info_client = ViTClient(address)
    shape = info_client.model_info().input_shape
    info_client.close()
    stop, errors, latencies, steps, rss = threading.Event(), [], [], [0], []
    rng = np.random.default_rng(0)
    images = rng.standard_normal((max(64, 2 * train_batch), *shape[1:]), dtype=np.float32)
    labels = rng.integers(0, 10, len(images))

    def predictor(k: int) -> None:
        with ViTClient(address, timeout=30) as c:
            i = k
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    c.predict(images[i % 64:i % 64 + 1])
                    latencies.append((time.monotonic(), time.perf_counter() - start))
                except ClientError as e:
                    errors.append(f"Predict: {e}")
                i += 1

    def trainer() -> None:
        with ViTClient(address, timeout=60) as c:
            i = 0
            while not stop.is_set():
                lo = (i * train_batch) % (len(images) - train_batch + 1)
                try:
                    c.train_step(images[lo:lo + train_batch], labels[lo:lo + train_batch], summaries=True)
                    steps[0] += 1
                except ClientError as e:
                    errors.append(f"TrainStep: {e}")
                i += 1

    def sampler() -> None:
        while not stop.wait(0.2):
            rss.append((time.monotonic(), rss_mb(pid)))

    threads = [threading.Thread(target=predictor, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=trainer), threading.Thread(target=sampler)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    stop.wait(warmup + seconds)
    stop.set()
    for t in threads:
        t.join()
    measured_from = begin + warmup
    samples = [m for t, m in rss if t >= measured_from]
    fifth = max(1, len(samples) // 5)
    fifths = [float(np.mean(samples[i * fifth:(i + 1) * fifth] or samples[-1:])) for i in range(5)]
    with ViTClient(address) as c:
        publishes = max(v.version for v in c.model_info().versions)
    ms = np.array([d for t, d in latencies if t >= measured_from]) * 1000
    return LoadReport(seconds=seconds, predict_calls=len(ms), train_steps=steps[0], errors=errors,
                      predict_p50_ms=float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                      predict_p99_ms=float(np.percentile(ms, 99)) if len(ms) else float("nan"),
                      rss_first_mb=fifths[1], rss_last_mb=fifths[4], rss_fifths_mb=fifths, publishes=publishes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default="artifacts/digits")
    p.add_argument("--seconds", type=float, default=30.0, help="measured duration (after a 2 s warm-up)")
    p.add_argument("--clients", type=int, default=8, help="concurrent single-image Predict clients")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth, second vs last fifth")
    p.add_argument("--train-batch", type=int, default=16, help="images per TrainStep")
    p.add_argument("--publish-every-steps", type=int, default=0, help="the server's automatic Publish (0: off)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as data:
        log_path = Path(data) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "server", "--artifacts", args.artifacts, "--port", "0",
                                     "--data-dir", data, "--metrics-port", "-1", "--http-port", "-1", "--publish-every-steps",
                                     str(args.publish_every_steps)], stdout=subprocess.PIPE, stderr=log, text=True)
            try:
                report = run_load(wait_until_listening(proc, log_path), proc.pid, args.seconds, args.clients,
                                  train_batch=args.train_batch)
            finally:
                stop_server(proc)
    print(json.dumps({**asdict(report), "rss_growth": report.rss_growth}, indent=2))
    ok = not report.errors and report.train_steps > 0 and report.rss_growth < args.max_rss_growth
    print(f"load test: {report.predict_calls} Predict calls (p50 {report.predict_p50_ms:.1f} ms, p99 "
          f"{report.predict_p99_ms:.1f} ms), {report.train_steps} train steps and {report.publishes} publishes in "
          f"{report.seconds:g} s, {len(report.errors)} errors, RSS by fifth "
          f"{' '.join(f'{m:.0f}' for m in report.rss_fifths_mb)} MB, second -> last fifth "
          f"({100 * report.rss_growth:+.1f}%): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
