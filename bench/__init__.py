"""vitserve's benchmark suite: `python -m bench [--quick] [--out bench/results]` (`make bench`).

Measures, in one run, the training and inference paths of the server against
PyTorch eager (and torch.compile) and raw in-process ONNX Runtime, dynamic
batching on vs off, the cost of gradient summaries, achieved GFLOP/s against a
matmul peak measured in the same run, and the export time of vit-tiny (issue 5).
Every figure is a median over repeats with its spread; ratios are computed pair
by pair (repeat r of a variant against repeat r of its reference).

Modules: stats (summaries, timing loops), flops (analytic FLOP counts),
artifacts (exported models cached under bench/.cache/), workloads (the
measurements), compile_worker (torch.compile in a subprocess with a time limit),
report (table, targets, JSON, PNG).
"""
