"""Imported for its effect, first, by the programs that serve (server/__main__.py, the isolated trainer's fork
server): `import onnxruntime` of the training build probes for ORTModule, whose package imports torch whenever
torch is installed (2.3 s and hundreds of MB the engine never uses). Marking that module absent makes the probe
fail fast, exactly as it does where torch is not installed; setdefault never undoes a real import. Nothing else
in engine/ does this on import.
"""
import sys

sys.modules.setdefault("onnxruntime.training.ortmodule", None)
