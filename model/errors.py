"""The export's one error type: `python -m model.export` prints it as one `EXPORT FAILED: ...` line and exits 1."""


class ExportError(Exception):
    """The model cannot be exported as asked (bad arguments, an unexportable graph, a failed self-check)."""


class ExportCheckError(ExportError):
    """ONNX Runtime and PyTorch disagree: the artifacts must not be used."""
