"""An int8 student: post-training static quantization of its ONNX graph with onnxruntime.

``student.int8.onnx`` is ``student.onnx`` with int8 weights (per output channel)
and int8 activations in the QDQ format (QuantizeLinear/DequantizeLinear pairs
around each quantized operator), whose activation ranges are calibrated (MinMax)
on images of the proxy set, which the server already holds. The API is
onnxruntime's own (``onnxruntime.quantization.quantize_static``, "Quantize ONNX
models" in the onnxruntime docs); the file loads in any onnxruntime, with
nothing of this project installed. Needs the ``onnx`` extra
(``pip install '.[onnx]'``), which brings onnxruntime.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CALIBRATION_IMAGES = 256  # proxy images the activation ranges are taken from
CALIBRATION_BATCH = 32


def available() -> bool:
    """Whether onnxruntime (and so quantization and ONNX inference) is installed."""
    return importlib.util.find_spec("onnxruntime") is not None


def quantize_int8(onnx_path: Path, calibration_images: torch.Tensor, out_path: Path) -> Path | None:
    """Write the int8 QDQ version of the float model at ``onnx_path``; None without onnxruntime.

    Args:
        onnx_path: a float ONNX model whose one input takes (N, C, H, W) float32 images.
        calibration_images: (N, C, H, W) images preprocessed as for the model (the proxy set); the first
            ``CALIBRATION_IMAGES`` are used.
        out_path: where the int8 model goes.
    """
    if not available():
        return None
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    images = calibration_images[:CALIBRATION_IMAGES].float().numpy()

    class ProxyImages(CalibrationDataReader):
        def __init__(self, input_name: str):
            self._batches = iter([{input_name: images[i:i + CALIBRATION_BATCH]}
                                  for i in range(0, len(images), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and graph optimised, as the docs advise
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out_path), ProxyImages(_input_name(prepared)),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )
    return out_path


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # as cpu_latency_ms measures torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N, classes) logits of the ONNX model at ``path`` on (N, C, H, W) ``images``, with onnxruntime."""
    session = _session(path)
    name = session.get_inputs()[0].name
    x = images.float().numpy()
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of the ONNX model at ``path``."""
    return float((onnx_logits(path, images).argmax(1) == labels.numpy()).mean())


def onnx_latency_ms(path: Path, input_shape: tuple[int, int, int], batch: int = 1, repeats: int = 200) -> float:
    """Median milliseconds per sample at ``batch`` on one CPU thread with onnxruntime, after warm-up."""
    session = _session(path)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(20):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3 / batch
