"""How much of the machine other processes used while the benchmark ran (the noise gauge).

A background thread samples /proc/stat (all CPU time spent, steal included) and the CPU
time of this process and its children once a second; what is left is other processes'
(or the hypervisor's) share of the cores. Figures measured while it is high are suspect,
and the report says which workloads ran under such load.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

CLOCK = os.sysconf("SC_CLK_TCK")


def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def _proc_jiffies(stat: str) -> tuple[int, int]:
    """(ppid, utime + stime + cutime + cstime) from a /proc/<pid>/stat line."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), sum(int(fields[i]) for i in (11, 12, 13, 14))


def _own_jiffies() -> int:
    """This process (and reaped children) plus its live descendants (an MPI job's ranks are grandchildren)."""
    me = os.getpid()
    total = _proc_jiffies(Path("/proc/self/stat").read_text())[1]
    processes = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name != str(me):
            try:
                processes[int(p.name)] = _proc_jiffies((p / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    for pid, (ppid, jiffies) in processes.items():
        while ppid in processes:  # up the tree to this process, if it is an ancestor
            ppid = processes[ppid][0]
        if ppid == me:
            total += jiffies
    return total


class CpuMonitor:
    """Samples other processes' share of all cores (0..1) every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self.samples: list[tuple[float, float]] = []  # (time.perf_counter(), foreign share)
        self.available = Path("/proc/stat").exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu-monitor", daemon=True)

    def start(self) -> "CpuMonitor":
        if self.available:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            t0, busy0, own0 = time.perf_counter(), _busy_jiffies(), _own_jiffies()
            while not self._stop.wait(self.interval):
                t1, busy1, own1 = time.perf_counter(), _busy_jiffies(), _own_jiffies()
                foreign = ((busy1 - busy0) - (own1 - own0)) / CLOCK / (self.cores * (t1 - t0))
                self.samples.append((t1, min(max(foreign, 0.0), 1.0)))
                t0, busy0, own0 = t1, busy1, own1
        except Exception:  # no /proc: no gauge, the benchmark goes on
            self.available = False

    def between(self, start: float, end: float) -> dict:
        """Mean and max foreign share (in % of all cores) of the samples taken in [start, end]."""
        values = [v for t, v in self.samples if start <= t <= end + self.interval]
        if not values:
            return {}
        return {"mean_pct": 100 * sum(values) / len(values), "max_pct": 100 * max(values), "samples": len(values)}
