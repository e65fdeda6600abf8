"""The int8 student: a quarter of the bytes, the fp32 student's accuracy, loadable by onnxruntime alone."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.data import client_set, server_sets
from common.models import build_student
from common.training import setup_compute, train_local
from server import quantization
from server.export import deployment_report, export_onnx
from server.reporting import save_checkpoint, summary_table

pytestmark = pytest.mark.skipif(not quantization.available(), reason="optional onnx extra (onnxruntime) not installed")

PREDICT_WITH_ONNXRUNTIME_ALONE = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
images = np.load(sys.argv[2])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: images})[0])
assert set(m for m in sys.modules if m.split('.')[0] in ('common', 'server', 'client', 'flwr', 'torch')) == set()
"""


@pytest.fixture(scope="module", params=["digits", "mnist-5k"])
def trained(request, tmp_path_factory):
    """A student trained on the clients' pool (2 epochs), exported to ONNX, with the proxy and test sets."""
    from tests.conftest import default_run_config

    config = RunConfig.from_mapping({**default_run_config(), "dataset": request.param})
    proxy_set, test_set = server_sets(config)
    pool = client_set(config, 0, 1)
    torch.manual_seed(0)
    student = build_student(pool.input_shape, pool.num_classes)
    train_local(student, pool, 2, 32, 0.05, setup_compute("cpu"), seed=0)
    folder = tmp_path_factory.mktemp(request.param)
    return student.eval(), export_onnx(student, pool.input_shape, folder / "student.onnx"), proxy_set, test_set


def test_the_int8_student_is_a_third_of_the_bytes_and_within_a_point_of_fp32(trained):
    _, fp32, proxy_set, test_set = trained
    int8 = quantization.quantize_int8(fp32, proxy_set.images, fp32.with_name("student.int8.onnx"))
    assert int8.stat().st_size <= 0.35 * fp32.stat().st_size
    fp32_accuracy = quantization.onnx_accuracy(fp32, test_set.images, test_set.labels)
    assert fp32_accuracy > 0.8  # a trained model, or the comparison says nothing
    assert quantization.onnx_accuracy(int8, test_set.images, test_set.labels) >= fp32_accuracy - 0.01


def test_the_fp32_onnx_student_in_onnxruntime_gives_the_torch_students_logits(trained):
    student, fp32, _, test_set = trained
    with torch.no_grad():
        expected = student(test_set.images[:32]).numpy()
    assert np.allclose(quantization.onnx_logits(fp32, test_set.images[:32]), expected, atol=1e-5)


def test_the_int8_file_predicts_in_a_process_that_imports_only_onnxruntime(trained, tmp_path):
    _, fp32, proxy_set, test_set = trained
    int8 = quantization.quantize_int8(fp32, proxy_set.images, tmp_path / "student.int8.onnx")
    np.save(tmp_path / "images.npy", test_set.images[:64].numpy())
    subprocess.run([sys.executable, "-c", PREDICT_WITH_ONNXRUNTIME_ALONE, str(int8), str(tmp_path / "images.npy"),
                    str(tmp_path / "logits.npy")], check=True, cwd=tmp_path)
    assert np.array_equal(np.load(tmp_path / "logits.npy"), quantization.onnx_logits(int8, test_set.images[:64]))


def test_the_run_summary_gives_the_int8_student_beside_the_fp32_one(trained, tmp_path):
    student, _, proxy_set, test_set = trained
    teacher = build_student(test_set.input_shape, test_set.num_classes)  # any model: only its files are read
    save_checkpoint(student, tmp_path / "student.safetensors")
    save_checkpoint(teacher, tmp_path / "global.safetensors")
    report = deployment_report(teacher, student, test_set.input_shape, tmp_path, proxy_set.images, test_set)
    int8 = report["student-int8"]
    assert (tmp_path / "student.int8.onnx").exists() and int8["files"]["onnx"]["path"] == "student.int8.onnx"
    assert int8["size-vs-fp32"] <= 0.35 and 0 <= int8["accuracy"] <= 1
    assert int8["latency-ms"] > 0 and report["student"]["onnx-latency-ms"] > 0
    summary = {"rounds": 1, "seconds": 1.0,
               "teacher": {"accuracy": 0.9, "loss": 0.3, "parameters": 10, "megabytes": 1.0},
               "student": {"accuracy": 0.9, "loss": 0.3, "parameters": 10, "megabytes": 0.2, **report["student"]},
               "student-int8": {**int8, "parameters": 10}}
    table = summary_table(summary)
    assert "student-int8" in table and "x the ONNX student's bytes" in table and "student.int8.onnx" in table


def test_without_calibration_images_no_int8_student_is_written(trained, tmp_path):
    student, _, _, test_set = trained
    save_checkpoint(student, tmp_path / "student.safetensors")
    save_checkpoint(student, tmp_path / "global.safetensors")
    report = deployment_report(student, student, test_set.input_shape, tmp_path)
    assert "student-int8" not in report and not (tmp_path / "student.int8.onnx").exists()
