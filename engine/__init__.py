"""vitserve's engine: the exported artifacts run with ONNX Runtime, numpy in and numpy out.

The manifest (what an export wrote), the inference and training engines, gradient summaries,
the learning-rate schedule, attention fusion, the training-graph explanation, the atomic store
and the Triton repository writer. It knows neither torch nor grpc: `model/` (the torch side:
define, export, verify) and `server/` (the front doors) both build on it.

Importing it changes no state that ONNX Runtime or the program uses (no log level, no options).
The one line below only keeps `import onnxruntime` from importing torch: the training build
probes for ORTModule, whose package imports torch whenever torch is installed (2.3 s and hundreds
of MB the engine never uses). Marking that module absent makes the probe fail fast, exactly as
it does where torch is not installed; setdefault never undoes a real import.
"""
import sys

sys.modules.setdefault("onnxruntime.training.ortmodule", None)

DEFAULT_MAX_BATCH_SIZE = 256  # the largest batch one request may carry unless the server is told otherwise
