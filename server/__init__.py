"""vitserve's gRPC server: engines over ONNX Runtime (numpy in, numpy out) and a thin servicer."""
