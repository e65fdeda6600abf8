"""The student as a deployable file, and what it costs to run.

``student.pt`` is TorchScript: an edge device loads it with ``torch.jit.load``
and needs none of this project's code. ``student.onnx`` and its int8 version
``student.int8.onnx`` (``server/quantization.py``) are written too when the
optional ``onnx`` extra is installed (``pip install '.[onnx]'``).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from logging import WARNING
from pathlib import Path

import torch
from flwr.common import log
from torch import nn

from common.data import Dataset
from server import quantization


def export_torchscript(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        # torch 2.9+ marks TorchScript deprecated; it is still the format every
        # libtorch runtime loads, which is what an edge deployment needs.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model.cpu().eval(), example)
        traced.save(str(path))
    return path


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path | None:
    """ONNX with a dynamic batch dimension, or None when the onnx extra is missing."""
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        return None
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model.cpu().eval(), (torch.zeros(2, *input_shape),), str(path),
        input_names=["images"], output_names=["logits"], dynamic_shapes={"x": {0: batch}},
        external_data=False, verbose=False,  # one self-contained file for the edge device
    )
    return path


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, int, int], repeats: int = 200) -> float:
    """Median milliseconds for one sample (batch of 1) on the CPU, after warm-up."""
    model = model.cpu().eval()
    x = torch.randn(1, *input_shape)
    for _ in range(20):
        model(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def export_files(model: nn.Module, input_shape, run_dir: Path, stem: str) -> dict[str, Path | None]:
    """``<stem>.safetensors`` (written each round by ``server/reporting.py``) beside the deployable files
    exported here: ``<stem>.pt`` (TorchScript) and ``<stem>.onnx`` (None without the onnx extra)."""
    return {"safetensors": run_dir / f"{stem}.safetensors",
            "torchscript": export_torchscript(model, input_shape, run_dir / f"{stem}.pt"),
            "onnx": export_onnx(model, input_shape, run_dir / f"{stem}.onnx")}


def family_report(model: nn.Module, input_shape, run_dir: Path, stem: str) -> dict:
    """A model family's final global model exported as the student is (:func:`export_files`): files, CPU latency."""
    return {"latency-ms": cpu_latency_ms(model, input_shape), "files": _files(export_files(model, input_shape,
                                                                                           run_dir, stem))}


def deployment_report(teacher: nn.Module, student: nn.Module, input_shape, run_dir: Path,
                      calibration: torch.Tensor | None = None, test_set: Dataset | None = None) -> dict:
    """Export the student; return the files and CPU latency of both models.

    With ``calibration`` images (the proxy set) and the ``test_set``, and onnxruntime installed, also
    the int8 student (``student-int8``): its file, test accuracy and onnxruntime latency per sample
    at batch 1 on one thread, beside the float ONNX student's (``onnx-latency-ms``).
    """
    files = {"student": export_files(student, input_shape, run_dir, "student"),
             "teacher": {"safetensors": run_dir / "global.safetensors"}}
    report = {
        name: {"latency-ms": cpu_latency_ms(model, input_shape), "files": _files(files[name])}
        for name, model in (("student", student), ("teacher", teacher))
    }
    fp32 = files["student"]["onnx"]
    if fp32 is not None and calibration is not None and test_set is not None and quantization.available():
        try:  # the int8 file is an extra: never lose the run's summary over it
            report["student-int8"] = _int8_report(fp32, calibration, test_set, run_dir / "student.int8.onnx")
            report["student"]["onnx-latency-ms"] = quantization.onnx_latency_ms(fp32, input_shape)
        except Exception as err:  # noqa: BLE001
            log(WARNING, "fl-distill: could not quantize the student to int8: %s: %s", type(err).__name__, err)
    return report


def _int8_report(fp32: Path, calibration: torch.Tensor, test_set: Dataset, path: Path) -> dict:
    int8 = quantization.quantize_int8(fp32, calibration, path)
    return {
        "accuracy": quantization.onnx_accuracy(int8, test_set.images, test_set.labels),
        "latency-ms": quantization.onnx_latency_ms(int8, test_set.input_shape),
        "megabytes": int8.stat().st_size / 1e6,
        "size-vs-fp32": int8.stat().st_size / fp32.stat().st_size,
        "files": _files({"onnx": int8}),
    }


def _files(paths: dict[str, Path | None]) -> dict[str, dict]:
    return {kind: {"path": p.name, "megabytes": p.stat().st_size / 1e6}
            for kind, p in paths.items() if p is not None and p.exists()}
