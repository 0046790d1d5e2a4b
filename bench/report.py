"""The run's outputs: the table (a block per section), the targets (met / not met), results.json, bench.png."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from bench.stats import REFERENCES, Row, Section, summarize

NOISY_PCT = 10.0  # other processes' mean share of the cores above which a workload's figures are flagged

# The table's sections in print order, with their titles.
SECTIONS = {
    Section.TRAIN_STEP: "Train step throughput",
    Section.TRAINERS: "The two trainers: one train step (summaries omitted), the ort trainer on both ONNX Runtimes",
    Section.PREDICT: "Predict latency (batch 1) and throughput (batch 8 / 32)",
    Section.DYNAMIC_BATCHING: "Dynamic batching",
    Section.SUMMARIES_COST: "Cost of gradient summaries",
    Section.MATMUL_PEAK: "float32 matmul peak (the 100% of achieved-flops)",
    Section.ACHIEVED_FLOPS: "Achieved GFLOP/s vs the matmul peak",
    Section.EXPORT: "Export time",
    Section.DATA_PARALLEL: "Data-parallel training (MPI, one ONNX Runtime thread per rank)",
    Section.ISOLATION: "Predict while training (4 single-image clients; training in the server process vs a child)",
    Section.FAILED: "Workloads that raised",
}
# the sections whose table shows every row's note (the others: only "n/a: ..." ones)
NOTED = (Section.TRAIN_STEP, Section.TRAINERS, Section.DYNAMIC_BATCHING, Section.ISOLATION, Section.MATMUL_PEAK, Section.ACHIEVED_FLOPS, Section.EXPORT,
         Section.DATA_PARALLEL)

# (description, row key, which figure, comparison, threshold)
TARGETS = [
    ("TrainStep over gRPC >= 1.2x PyTorch eager images/s (vit-small64, b32)", "train/vit-small64/grpc", "vs_torch", ">=", 1.2),
    # the training step itself: the engine without the summaries, which PyTorch eager does not compute either
    ("engine in-process train step >= 1.0x PyTorch eager, summaries omitted (vit-small64, b32)",
     "train/vit-small64/engine-bare", "vs_torch", ">=", 1.0),
    ("engine in-process train step >= 0.8x PyTorch eager, summaries omitted (digits, b64)", "train/digits/engine-bare",
     "vs_torch", ">=", 0.8),
    ("TrainStep over gRPC >= 0.95x the engine in-process, full summaries (digits, b64)", "train/digits/grpc", "vs_ort",
     ">=", 0.95),
    ("Predict over gRPC >= 1.5x PyTorch eager (vit-tiny, b8)", "predict/vit-tiny/b8/Predict over gRPC", "vs_torch", ">=", 1.5),
    ("Predict over gRPC >= 0.9x raw in-process ORT (vit-tiny, b8)", "predict/vit-tiny/b8/Predict over gRPC", "vs_ort", ">=", 0.9),
    ("dynamic batching >= 2x unbatched throughput, 16 clients in another process (digits)", "dynamic/digits/speedup",
     "median", ">=", 2.0),
    ("dynamic batching >= 3x unbatched throughput, 16 clients (vit-small64)", "dynamic/vit-small64/speedup", "median", ">=", 3.0),
    ("Predict p99 with training <= 3x without, training isolated (digits, train b64)",
     "isolation/digits/process/p99-ratio", "median", "<=", 3.0),
    ("Predict p99 with training <= 3x without, training isolated (vit-small64, train b32)",
     "isolation/vit-small64/process/p99-ratio", "median", "<=", 3.0),
    ("full gradient summaries <= 5% of step time (vit-small64, b32)", "summaries/vit-small64/overhead", "median", "<=", 5.0),
    ("full gradient summaries <= 5% of step time (digits, b64)", "summaries/digits/overhead", "median", "<=", 5.0),
    # the two trainers: the ort trainer on the maintained onnxruntime (.venv-ort), on the CPU execution provider and
    # on OpenVINO's, against eager and the artifacts
    *(target for variant, who in (("ort-new", "ort trainer (onnxruntime 1.31, CPU EP)"),
                                  ("ort-openvino", "ort trainer (onnxruntime 1.31, --device openvino)"))
      for target in (
          (f"{who} >= 1.05x PyTorch eager (vit-small64, b32)", f"trainers/vit-small64/{variant}", "vs_torch", ">=", 1.05),
          *((f"{who} >= 1.0x the ort-training trainer ({title})", f"trainers/{preset}/{variant}", "vs_ort", ">=", 1.0)
            for preset, title in (("digits", "digits, b64"), ("vit-small64", "vit-small64, b32"),
                                  ("vit-s16-224", "timm ViT-S/16 224, b8"))))),
    ("inference >= 80% of matmul peak (vit-tiny, Predict over gRPC, b32)",
     "flops/predict/vit-tiny/b32/Predict over gRPC", "peak_pct", ">=", 80.0),
]


def fmt(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_ratio(ratios: list[float] | None) -> str:
    if not ratios:
        return ""
    s = summarize(ratios)
    return f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"


def machine(started: datetime.datetime, load_start, load_end, threads: int, plan) -> dict:
    import grpc
    import numpy as np
    import onnxruntime
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    blas = []
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception:
        pass

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except Exception:
            return ""

    return {
        "date": started.isoformat(timespec="seconds"),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "threads_used": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_threads": "session default (intra_op_num_threads 0: all cores)",
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "blas": blas,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len([l for l in git("status", "--porcelain").splitlines() if l.strip()]),
        "mode": "quick" if plan.quick else "full",
    }


def header_lines(m: dict, plan, elapsed: float) -> list[str]:
    blas = "; ".join(f"{b['internal_api']} {b['version']} {b['architecture']} x{b['num_threads']}" for b in m["blas"])
    return [
        f"vitserve benchmark ({m['mode']}) {m['date']}  git {m['git_commit']}"
        f"{' + ' + str(m['git_dirty_files']) + ' changed files' if m['git_dirty_files'] else ''}",
        f"machine: {m['cpu']}, {m['cpu_count']} cores ({m['threads_used']} used); {m['platform']}",
        f"python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), onnxruntime {m['onnxruntime']} "
        f"(default threads), numpy {m['numpy']} [{blas or 'blas ?'}], grpcio {m['grpcio']}, "
        f"OPENBLAS_CORETYPE={m['OPENBLAS_CORETYPE']}" + ort_env_text(m.get("ort_env")),
        f"load average at start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
        f"{' '.join(f'{x:.2f}' for x in m['loadavg_end'])}; other processes used {load_text(m.get('other_load'))} "
        f"of the cores during the run; run took {elapsed:.0f} s; "
        f"{plan.repeats} repeats per figure (vit-tiny b32: {plan.heavy_repeats}, dynamic batching: {plan.dynamic_repeats})",
        "median over repeats; spread = [min-max] over repeats (latency p50/p99: the pooled percentile, "
        "spread of the per-repeat ones);",
        "ratios are speedups (>1: faster than the reference), computed per repeat pair: median [min-max];",
        server_line(m.get("server")),
        f"'other load': % of all cores used by other processes (and steal) while the row's workload ran; "
        f"'!' marks > {NOISY_PCT:.0f}%: such figures are suspect, rerun on a quiet machine.",
    ]


def ort_env_text(env: dict | None) -> str:
    if not env:
        return ""
    return f"; the ort trainer's .venv-ort: python {env['python']}, onnxruntime {env['onnxruntime']}"


def server_line(settings: dict | None) -> str:
    if not settings:
        return "servers: in-process, 127.0.0.1, port 0, called through client.ViTClient;"
    keys = ("dynamic_batching", "max_batch_delay_ms", "max_dynamic_batch", "workers", "intra_op_threads", "device")
    return ("servers: in-process (create_server on 127.0.0.1, port 0), called through client.ViTClient, "
            "server defaults: " + ", ".join(f"{k}={settings[k]}" for k in keys) +
            f" ({Section.DYNAMIC_BATCHING} sets dynamic_batching per variant);")


def load_text(load: dict | None) -> str:
    if not load:
        return "(unknown)"
    return f"mean {load['mean_pct']:.0f}% (max {load['max_pct']:.0f}%)"


def timing_lines(timings: dict) -> list[str]:
    parts = []
    for name, t in timings.items():
        load = t["other_load"]
        parts.append(f"{name} {t['seconds']:.0f} s" + (f" (other load {load['mean_pct']:.0f}%)" if load else ""))
    noisy = [n for n, t in timings.items() if t["other_load"] and t["other_load"]["mean_pct"] > NOISY_PCT]
    lines = ["", "workloads: " + ", ".join(parts)]
    if noisy:
        lines.append(f"WARNING: other processes used > {NOISY_PCT:.0f}% of the cores during: {', '.join(noisy)}; "
                     "their figures are suspect.")
    return lines


def section_order(row: Row) -> int:
    """Sort key: the row's section's place in SECTIONS (sorting is stable: measurement order within a section)."""
    return list(SECTIONS).index(row.section)


def table_lines(rows: list[Row]) -> list[str]:
    cols = ["workload", "variant", "median", "spread [min-max]", "unit", "vs PyTorch eager", "vs raw ORT",
            "% of peak", "other load", "note"]
    body = []
    for r in rows:
        s = r.summary
        spread = f"[{fmt(s['min'])}-{fmt(s['max'])}]" if s["n"] > 1 else ""
        pct = summarize(r.peak_pct)["median"] if r.peak_pct else None
        note = r.note if r.note.startswith("n/a") or r.section in NOTED else ""
        body.append([r.workload, r.variant, fmt(s.get("median")) if s["n"] else "n/a", spread, r.unit,
                     fmt_ratio(r.vs_torch), fmt_ratio(r.vs_ort), f"{pct:.0f}%" if pct is not None else "",
                     "" if r.other_load is None else
                     f"{r.other_load:.0f}%{'!' if r.other_load > NOISY_PCT else ''}",
                     note[:110], r.section])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = []

    def line(values):
        return "  ".join(v.ljust(w) if i in (0, 1, 4, 9) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    section = None
    for b in body:
        if b[-1] != section:
            section = b[-1]
            titles = [REFERENCES[section][1] if c == "vs raw ORT" and section in REFERENCES else c for c in cols]
            lines += ["", f"{section}: {SECTIONS[section]}", line(titles), line(["-" * w for w in widths])]
        lines.append(line(b[:-1]))
    return lines


def targets(rows: list[Row]) -> list[dict]:
    by_key = {r.key: r for r in rows}
    out = []
    for text, key, what, op, threshold in TARGETS:
        r = by_key.get(key)
        values = None
        if r is not None:
            values = {"vs_torch": r.vs_torch, "vs_ort": r.vs_ort, "peak_pct": r.peak_pct, "median": r.samples}[what]
        if not values:
            out.append({"target": text, "key": key, "status": "n/a", "measured": None,
                        "note": r.note if r is not None else "not measured"})
            continue
        s = summarize(values)
        value = s["median"]
        met = value >= threshold if op == ">=" else value <= threshold
        certain = (s["min"] >= threshold or s["max"] < threshold) if op == ">=" else \
            (s["max"] <= threshold or s["min"] > threshold)
        out.append({"target": text, "key": key, "status": "met" if met else "not met", "measured": value,
                    "min": s["min"], "max": s["max"], "threshold": threshold, "op": op,
                    "spread_crosses_threshold": not certain})
    return out


def target_lines(results: list[dict]) -> list[str]:
    lines = ["", "Targets (median of the per-repeat figures [min-max]):"]
    for t in results:
        if t["measured"] is None:
            lines.append(f"  n/a      {t['target']}: {t['note']}")
            continue
        unit = "%" if t["key"].startswith(("summaries", "flops")) else "x"
        measured = f"{t['measured']:.2f}{unit} [{t['min']:.2f}-{t['max']:.2f}]"
        flag = " (spread crosses the target)" if t["spread_crosses_threshold"] else ""
        lines.append(f"  {t['status']:<8} {t['target']}: measured {measured}{flag}")
    return lines


def write_json(path: Path, m: dict, plan, rows: list[Row], target_results: list[dict], info: dict,
               timings: dict, elapsed: float) -> None:
    import dataclasses

    doc = {"machine": m, "plan": dataclasses.asdict(plan), "elapsed_s": elapsed, "workload_seconds": timings,
           "info": info, "targets": target_results, "rows": [r.as_dict() for r in rows]}
    path.write_text(json.dumps(doc, indent=2, default=str))


def write_chart(path: Path, rows: list[Row], target_results: list[dict], m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    def label(r):
        return f"{r.workload}{' ' + r.unit.split()[-1] if r.unit.startswith('ms') else ''}: {r.variant}"

    speeds = [r for r in rows
              if r.section in (Section.TRAIN_STEP, Section.TRAINERS, Section.PREDICT) and r.unit in ("images/s", "ms p50")]
    ratio_rows = [(label(r), r.vs_torch, "vs PyTorch eager") for r in speeds if r.vs_torch]
    ratio_rows += [(label(r), r.vs_ort, "vs ort-training" if r.section == Section.TRAINERS else "vs raw ORT / engine")
                   for r in speeds if r.vs_ort]
    ratio_rows += [(f"{r.workload.split(',')[0]}: on/off", r.samples, "batching on vs off") for r in rows
                   if r.key.endswith("/speedup") and r.samples]
    peak_rows = [r for r in rows if r.peak_pct]
    dyn_rows = [r for r in rows if r.section == Section.DYNAMIC_BATCHING and r.unit == "images/s" and r.samples]
    sum_rows = [r for r in rows if r.section == Section.SUMMARIES_COST and r.unit == "ms/step" and r.samples
                and "engine" not in r.key]

    heights = [max(3.0, 0.26 * len(ratio_rows) + 1), max(2.5, 0.26 * len(peak_rows) + 1),
               max(2.2, 0.3 * max(len(dyn_rows), len(sum_rows)) + 1.2)]
    fig = plt.figure(figsize=(12, sum(heights) + 0.6))
    grid = fig.add_gridspec(3, 2, height_ratios=heights, width_ratios=[1, 1])
    axes = [fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, :]), fig.add_subplot(grid[2, 0]),
            fig.add_subplot(grid[2, 1])]
    colors = {"vs PyTorch eager": "tab:blue", "vs raw ORT / engine": "tab:orange", "vs ort-training": "tab:red",
              "batching on vs off": "tab:green"}

    def bars(ax, labels, stats, cols):
        y = np.arange(len(labels))[::-1]
        v = np.asarray([s["median"] for s in stats])
        err = [v - np.asarray([s["min"] for s in stats]), np.asarray([s["max"] for s in stats]) - v]
        ax.barh(y, v, color=cols, xerr=err, capsize=2, alpha=0.85)
        ax.set_yticks(y, labels, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        for yi, vi, hi in zip(y, v, [s["max"] for s in stats]):
            ax.annotate(fmt(float(vi)), (max(vi, hi), yi), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=6)

    ax = axes[0]
    if ratio_rows:
        bars(ax, [f"{l} ({k})" for l, _, k in ratio_rows], [summarize(v) for _, v, _ in ratio_rows],
             [colors[k] for _, _, k in ratio_rows])
        ax.axvline(1.0, color="black", lw=0.8)
        for t, style in ((0.9, (0, (1, 3))), (1.05, (0, (3, 2))), (1.2, ":"), (1.5, "--"), (3.0, "-.")):
            ax.axvline(t, color="red", lw=0.6, ls=style)
        ax.set_xscale("log")
    ax.set_title("speedup, median [min-max] of per-repeat pairs; red lines: the targets 0.9x, 1.05x, 1.2x, 1.5x, 3x",
                 fontsize=9)

    ax = axes[1]
    if peak_rows:
        bars(ax, [f"{r.workload}: {r.variant}" for r in peak_rows], [summarize(r.peak_pct) for r in peak_rows],
             "tab:purple")
        ax.axvline(80, color="red", lw=0.6, ls="--")
    ax.set_title(f"{Section.ACHIEVED_FLOPS}: GFLOP/s as % of the float32 matmul peak measured in the same run "
                 "(target 80%)", fontsize=9)

    ax = axes[2]
    if dyn_rows:
        bars(ax, [f"{r.workload.split(',')[0].replace('dynamic batching ', '')}: {r.variant}" for r in dyn_rows],
             [summarize(r.samples) for r in dyn_rows],
             ["tab:purple" if "ceiling" in r.variant else "tab:green" if r.variant == "batching on" else "tab:gray"
              for r in dyn_rows])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap here
    ax.set_title(f"{Section.DYNAMIC_BATCHING}, 16 single-image clients: images/s", fontsize=8)

    ax = axes[3]
    if sum_rows:
        bars(ax, [f"{r.workload.replace('train ', '')}: {'full' if 'full' in r.variant else 'omitted'}"
                  for r in sum_rows], [summarize(r.samples) for r in sum_rows],
             ["tab:gray" if "full" in r.variant else "tab:cyan" for r in sum_rows])
    ax.set_title(f"{Section.SUMMARIES_COST}: TrainStep over gRPC, ms/step", fontsize=8)

    fig.suptitle(f"vitserve bench ({m['mode']}), {m['cpu']}, {m['cpu_count']} cores, {m['date']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
