"""vitserve's engine: the exported artifacts run with ONNX Runtime, numpy in and numpy out.

At the top, the records and the runtime: the manifest (what an export wrote), errors, providers and session
options, the inference engine. Then three rooms: `train/` (the step function, its two backends, isolation and
data-parallel ranks), `graph/` (explaining, fusing and rewriting ONNX graphs) and `store/` (checkpoints,
versions, a fleet's model repository, Triton's configuration). It knows neither torch nor grpc: `model/` (the
torch side: define, export, verify) and `server/` (the front doors) both build on it. Importing it changes no
global state; a program that wants the training build's torch probe skipped says so by importing
engine.no_ortmodule_probe first.
"""

DEFAULT_MAX_BATCH_SIZE = 256  # the largest batch one request may carry unless the server is told otherwise
