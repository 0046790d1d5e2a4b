"""Graph work on ONNX models: where the loss and each gradient are computed (explain.py for the onnxruntime-training
graph, graph_explain.py for the gradient graph, on its analysis: gradient_graph.py, forward_units.py and
backward_matching.py), head importance (heads.py), attention fused for inference (fusion.py), and the rewrites and
graph helpers they share (rewrite.py)."""
