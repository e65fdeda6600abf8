"""Running an installed model on the device: onnxruntime when installed, else TorchScript.

Shared by the delivery handler (which measures what it installed) and
``fl-distill-predict``. A model of the manifest names its files, e.g.
``{"onnx": "student.onnx", "torchscript": "student.pt"}``; the int8 student has
an ONNX file only, so it needs onnxruntime.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Runner:
    """One installed model, ready to run: ``predict`` maps (N, C, H, W) float32 images to (N, classes) logits."""

    name: str
    path: Path
    runtime: str  # "onnxruntime" or "torchscript"
    predict: Callable[[np.ndarray], np.ndarray]


class NoRuntimeError(RuntimeError):
    """The model's files need a runtime this device does not have."""


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def runner(folder: Path, name: str, files: dict[str, str], threads: int = 1) -> Runner:
    """The model ``name`` of an installed folder, with onnxruntime (``files["onnx"]``) or TorchScript.

    Raises:
        NoRuntimeError: the model has only an ONNX file and onnxruntime is not installed.
    """
    if "onnx" in files and onnxruntime_available():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        session = ort.InferenceSession(str(folder / files["onnx"]), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return Runner(name, folder / files["onnx"], "onnxruntime",
                      lambda x: session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0])
    if "torchscript" in files:
        import torch

        torch.set_num_threads(threads)
        module = torch.jit.load(str(folder / files["torchscript"]), map_location="cpu").eval()

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

        return Runner(name, folder / files["torchscript"], "torchscript", predict)
    raise NoRuntimeError(f"model {name!r} has only {sorted(files.values())}: install onnxruntime to run it")


def latency_ms(model: Runner, input_shape: tuple[int, ...], batch: int, seconds: float = 0.1) -> float:
    """Median milliseconds per sample at ``batch``, over about ``seconds`` of calls after a warm-up."""
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(5):
        model.predict(x)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < deadline:
        started = time.perf_counter()
        model.predict(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3 / batch


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> str:
    """What the delivered models run on here: 'cpu: <model>, N cores' (the runtimes are run on the CPU)."""
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores"
