"""Training: the one step function (step.py) over two backends (graph_backend.py, ort_training.py), and what wraps
it (isolation.py: a child process; parallel.py: data-parallel ranks over MPI), with its parts: the optimizers
(optim.py), where the `ort` backend's state lives (buffers.py), the learning-rate policy (schedule.py) and
gradient summaries (gradients.py)."""
