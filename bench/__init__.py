"""vitserve's benchmark suite: `python -m bench [--quick] [--out bench/results]` (`make bench`).

Measures, in one run, the training and inference paths of the server against
PyTorch eager (and torch.compile) and raw in-process ONNX Runtime (train-step,
predict), the two trainers against each other and against eager (trainers),
dynamic batching on vs off (dynamic-batching), the cost of gradient summaries
(summaries-cost), achieved GFLOP/s (achieved-flops) against a matmul peak
measured in the same run (matmul-peak), and the export time of vit-tiny
(export); those names label the table's sections, the rows of results.json and
the chart.
Every figure is a median over repeats with its spread; ratios are computed pair
by pair (repeat r of a variant against repeat r of its reference).

Modules: stats (rows, section names, summaries, timing loops), flops (analytic FLOP counts),
artifacts (exported models cached under bench/.cache/), workloads (the measurements),
compile_worker (torch.compile in a subprocess with a time limit), trainer_worker (the `ort`
trainer's step in .venv-ort, on the maintained onnxruntime), timm_vit (timm's ViT-S/16 at 224
through the tests' torchvision shim), report (table, targets, JSON, PNG), cpu (the other-load
gauge), loadtest (`make loadtest`: a bounded load test against a server process).
"""
