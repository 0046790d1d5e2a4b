"""ONNX Runtime plumbing shared by the inference and training engines: device -> session, session options."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import weakref

import onnxruntime as ort

from engine.errors import ConfigError

VERSION = ort.__version__  # the onnxruntime this process runs (GetModelInfo, the startup log)


def quiet_default_logger() -> None:
    """Keep ORT's process-wide default logger to errors only. Called by the programs (server, export), never on import.

    That logger (not a session's) reports graph clean-ups as warnings, e.g. 17 lines per Publish
    ("Removing initializer ... not used by any node").
    """
    ort.set_default_logger_severity(3)


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' -> ('cuda', 0); 'cuda:1' -> ('cuda', 1); 'openvino' -> ('openvino', 0)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "openvino") or (index and not index.isdigit()) or (kind != "cuda" and index):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'openvino', got {device!r}")
    return kind, int(index or 0)


def open_session(model: str | bytes, options: ort.SessionOptions, device: str) -> ort.InferenceSession:
    """An InferenceSession of `model` (a path or a serialized ModelProto) on `device`: every session the engines
    run on a device is opened here."""
    if parse_device(device)[0] == "openvino":
        _add_openvino(options)
        return ort.InferenceSession(model, options)
    return ort.InferenceSession(model, options, providers=_providers(device))


def _providers(device: str) -> list:
    """Execution providers for 'cpu' or 'cuda[:N]', refusing CUDA where this ONNX Runtime build has none."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(
            f"device {device!r} asked for CUDA, but this ONNX Runtime build only has {available}: "
            "on a machine with an NVIDIA GPU install onnxruntime-gpu (CUDA 12/13; pip install '.[gpu]') for --trainer ort, "
            "or onnxruntime-training's CUDA 11.8 build for --trainer ort-training; else use --device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def check_device(device: str) -> None:
    """Refuse at startup a device this process cannot run (a ConfigError saying what to install)."""
    if parse_device(device)[0] == "openvino":
        _openvino_cpu()
    else:
        _providers(device)


# Options that already carry OpenVINO's execution provider: ONNX Runtime refuses to add it to the same options twice.
_with_openvino: weakref.WeakSet = weakref.WeakSet()


def _add_openvino(options: ort.SessionOptions) -> None:
    """OpenVINO's execution provider (a plugin library, onnxruntime >= 1.23) on the CPU, in float32.

    A plugin EP is chosen through the session options (add_provider_for_devices); a `providers=` list naming it
    is ignored without a word and the session runs on the CPU EP (docs/design.md)."""
    if options in _with_openvino:
        return
    device = _openvino_cpu()  # first: it says what is missing where the runtime has no plugin API
    config = {
        # float32 throughout: OpenVINO's CPU plugin otherwise runs bfloat16 on CPUs that have it (AMX,
        # avx512_bf16), and the gradients must stay within 1e-5 of PyTorch's.
        "INFERENCE_PRECISION_HINT": "f32",
    }
    if options.intra_op_num_threads > 0:  # OpenVINO keeps its own threads; the EP ignores ORT's intra-op setting
        config["INFERENCE_NUM_THREADS"] = options.intra_op_num_threads
    options.add_provider_for_devices([device], {"load_config": json.dumps({"CPU": config})})
    _with_openvino.add(options)


def _openvino_cpu():
    """The CPU device of OpenVINO's execution provider plugin, registered with onnxruntime on first use."""
    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        raise ConfigError("device 'openvino' needs OpenVINO's execution provider plugin: pip install '.[openvino]' "
                          "(onnxruntime-ep-openvino; onnxruntime >= 1.23, x86-64)") from None
    if not hasattr(ort, "register_execution_provider_library"):
        raise ConfigError(f"device 'openvino' needs onnxruntime >= 1.23 (plugin execution providers); this process "
                          f"runs onnxruntime {ort.__version__}")
    name = plugin.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, plugin.get_library_path())
    cpus = [d for d in ort.get_ep_devices()
            if d.ep_name == name and d.device.type == ort.OrtHardwareDeviceType.CPU]
    if not cpus:
        raise ConfigError(f"OpenVINO's execution provider {plugin.__name__} found no CPU device here")
    return cpus[0]


def session_options(intra_op_threads: int = 0, *, training: bool = True) -> ort.SessionOptions:
    """Session options for the sessions the server opens.

    Training sessions run with enable_mem_pattern off: with it on, ORT 1.19.2's training
    session was seen to return a garbage loss (1e-5 instead of 2.47) for a 6-block ViT
    while its gradients were right (docs/design.md). The loss parity tests guard this.
    Inference sessions keep ORT's defaults (memory patterns on).
    """
    options = ort.SessionOptions()
    options.enable_mem_pattern = not training
    options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3  # warnings and below are noise for a server
    return options


_tuned = False


def tune_process_for_training() -> None:
    """Process-wide settings under which ONNX Runtime's training step runs fastest here; idempotent.

    numpy's BLAS (OpenBLAS) runs on one thread. The engine's few BLAS calls (the global gradient norm's
    and the summaries' dot products) otherwise wake OpenBLAS's own pool, whose threads spin after each
    call on the cores ORT's intra-op threads need: a digits b64 step took 66 ms instead of 34
    (docs/performance.md). The training process (`--train-isolation process`) gets this when its
    engine is built, as does any process that builds a TrainingEngine.
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def release_freed_memory() -> None:
    """Give memory the process freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Each Publish builds and drops ONNX Runtime sessions (the fusion check's two and the old served one);
    glibc keeps their freed arenas mapped, so a long run with frequent publishes grew its RSS by
    ~7% in 2.5 minutes (make soak) while the live heap did not grow.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def resident_bytes() -> int:
    """The process's resident set size in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
