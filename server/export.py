"""The student as a deployable file, and what it costs to run.

``student.pt`` is TorchScript: an edge device loads it with ``torch.jit.load``
and needs none of this project's code. ``student.onnx`` is written too when
the optional ``onnx`` extra is installed (``pip install '.[onnx]'``).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn


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


def deployment_report(teacher: nn.Module, student: nn.Module, input_shape, run_dir: Path) -> dict:
    """Export the student; return the files and CPU latency of both models."""
    files = {
        "student": {"safetensors": run_dir / "student.safetensors",
                    "torchscript": export_torchscript(student, input_shape, run_dir / "student.pt"),
                    "onnx": export_onnx(student, input_shape, run_dir / "student.onnx")},
        "teacher": {"safetensors": run_dir / "global.safetensors"},
    }
    return {
        name: {
            "latency-ms": cpu_latency_ms(model, input_shape),
            "files": {kind: {"path": p.name, "megabytes": p.stat().st_size / 1e6}
                      for kind, p in files[name].items() if p is not None and p.exists()},
        }
        for name, model in (("student", student), ("teacher", teacher))
    }
