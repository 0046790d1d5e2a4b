"""python -m bench [--quick] [--out bench/results] [--only NAME ...]: the whole benchmark, one run.

Prints the table (with the machine and the targets, met / not met), one section per kind of
measurement (train-step with fit, trainers, predict, dynamic-batching, summaries-cost, matmul-peak, achieved-flops,
export, data-parallel), and writes <out>/results.txt, <out>/results.json and <out>/bench.png. Exported models
are cached in bench/.cache/.
--quick (~4 minutes with the models cached, CI smoke test): fewer repeats, shorter windows, no torch.compile.
The trainers workloads run the `ort` trainer on the maintained onnxruntime in .venv-ort (`make ort-env`, built
when missing; --ort-python another) and timm's ViT-S/16 at 224 (exported once into the cache: minutes).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: ~2 minutes, fewer repeats, no torch.compile")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="folder for results.txt, results.json and bench.png")
    p.add_argument("--cache", type=Path, default=None, help="exported models (default bench/.cache)")
    p.add_argument("--ort-python", type=Path, default=None,
                   help="the Python of the maintained-onnxruntime environment (default .venv-ort/bin/python, "
                        "built with make ort-env when missing)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only the workloads whose name contains one of these words (e.g. train-step predict); "
                        "the matmul peak always runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started_at = datetime.datetime.now().astimezone()
    started = time.perf_counter()
    load_start = os.getloadavg()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch
    from tqdm import tqdm

    from bench import fit as fit_workloads, report, workloads as w
    from bench.artifacts import DEFAULT_CACHE, ArtifactCache
    from bench.cpu import CpuMonitor
    from bench.stats import Row, Section

    plan = w.Plan.quick_plan() if args.quick else w.Plan()
    ctx = w.Context(plan, ArtifactCache(args.cache or DEFAULT_CACHE), args.ort_python or w.ORT_PYTHON)
    torch.set_num_threads(ctx.threads)  # PyTorch gets the cores ONNX Runtime's default uses

    steps = [
        ("matmul-peak", lambda: w.matmul_peak(ctx)),
        ("export vit-tiny", lambda: w.export_time(ctx, "vit-tiny")),
        ("train-step digits b64", lambda: w.train(ctx, "digits", 64)),  # and summaries-cost
        ("train-step vit-small64 b32", lambda: w.train(ctx, "vit-small64", 32)),
        ("train-step torch.compile digits b64", lambda: w.train_compiled(ctx, "digits", 64)),
        ("train-step torch.compile vit-small64 b32", lambda: w.train_compiled(ctx, "vit-small64", 32)),
        ("fit digits b64", lambda: fit_workloads.fit(ctx, "digits", 64)),  # vitserve fit vs a bare TrainStep loop
        ("fit vit-small64 b32", lambda: fit_workloads.fit(ctx, "vit-small64", 32)),
        ("trainers digits b64", lambda: w.trainers(ctx, "digits", 64)),
        ("trainers vit-small64 b32", lambda: w.trainers(ctx, "vit-small64", 32)),
        ("trainers vit-s16-224 b8", lambda: w.trainers(ctx, "vit-s16-224", 8)),
        ("predict digits", lambda: w.predict(ctx, "digits")),
        ("predict vit-tiny", lambda: w.predict(ctx, "vit-tiny")),
        ("isolation digits", lambda: w.predict_under_training(ctx, "digits", 64)),
        ("isolation vit-small64", lambda: w.predict_under_training(ctx, "vit-small64", 32)),
        ("dynamic-batching digits", lambda: w.dynamic_batching(ctx, "digits")),
        ("dynamic-batching vit-small64", lambda: w.dynamic_batching(ctx, "vit-small64")),
        ("data-parallel digits b64", lambda: w.data_parallel(ctx, "digits", 64)),
        ("data-parallel vit-small64 b32", lambda: w.data_parallel(ctx, "vit-small64", 32)),
        ("matmul-peak (again)", lambda: w.matmul_peak(ctx)),
    ]
    if args.only:
        steps = [s for s in steps if any(word in s[0] for word in args.only) or s[0].startswith("matmul-peak")]

    rows: list[Row] = []
    timings: dict[str, dict] = {}
    monitor = CpuMonitor().start()
    bar = tqdm(steps, desc="bench", unit="workload", file=sys.stderr, dynamic_ncols=True)
    for name, fn in bar:
        bar.set_description(name)
        t = time.perf_counter()
        try:
            new = fn()
        except Exception as e:  # one broken workload must not lose the others' figures
            traceback.print_exc()
            new = [Row(Section.FAILED, name, "error", "", note=f"n/a: {type(e).__name__}: {str(e)[:150]}",
                       key=f"error/{name}")]
        end = time.perf_counter()
        load = monitor.between(t, end)
        for r in new:
            r.other_load = load.get("mean_pct")
        rows += new
        timings[name] = {"seconds": round(end - t, 1), "other_load": load}
    bar.close()
    monitor.stop()
    run_load = monitor.between(started, time.perf_counter())

    # the two matmul-peak passes are one figure: every sample, the best one is the peak
    peaks = {}
    for r in [r for r in rows if r.key.startswith("peak/")]:
        if r.key in peaks:
            peaks[r.key].samples += r.samples
            peaks[r.key].value = max(peaks[r.key].samples)
            loads = [x for x in (peaks[r.key].other_load, r.other_load) if x is not None]
            peaks[r.key].other_load = max(loads) if loads else None
            rows.remove(r)
        else:
            peaks[r.key] = r
    numpy_peak = peaks.get("peak/numpy @ (OpenBLAS)")
    if numpy_peak is not None:
        numpy_peak.note = (f"best of {len(numpy_peak.samples)} (start and end of the run): "
                           "the 100% of achieved-flops' % of peak")
        ctx.info["peak_gflops"] = numpy_peak.value
        rows += w.achieved_flops(rows, numpy_peak.value)
    for r in peaks.values():
        r.note = r.note.replace("(median shown in spread)", "").strip() if r is not numpy_peak else r.note

    rows.sort(key=report.section_order)  # stable: measurement order within a section
    ctx.close()

    elapsed = time.perf_counter() - started
    m = report.machine(started_at, load_start, os.getloadavg(), ctx.threads, plan)
    m["other_load"] = run_load
    m["server"] = ctx.info.get("server_settings")
    m["ort_env"] = ctx.info.get("ort_env")
    target_results = report.targets(rows)
    lines = report.header_lines(m, plan, elapsed) + report.table_lines(rows) + report.target_lines(target_results)
    lines.append("")
    lines += report.timing_lines(timings)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "results.json", m, plan, rows, target_results, ctx.info, timings, elapsed)
    chart = args.out / "bench.png"
    try:
        report.write_chart(chart, rows, target_results, m)
    except Exception:
        traceback.print_exc()
        chart = None
    lines.append(f"wrote {args.out / 'results.json'}" + (f" and {chart}" if chart else " (no chart: see the error)"))
    (args.out / "results.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
