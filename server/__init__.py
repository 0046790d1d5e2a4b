"""vitserve's gRPC server: engines over ONNX Runtime (numpy in, numpy out) and a thin servicer."""
import sys

# `import onnxruntime` (the training build) probes for ORTModule, whose package imports torch
# whenever torch is installed: 2.3 s and hundreds of MB the server never uses (the serving
# path must not import torch). Marking the module absent makes that probe fail fast, exactly
# as it does in a serving environment without torch. setdefault: never undo a real import.
sys.modules.setdefault("onnxruntime.training.ortmodule", None)
