"""The deployable student: exported files that predict exactly like the trained student."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.models import build_student, build_teacher
from server.export import deployment_report
from server.reporting import save_checkpoint

SHAPE = (1, 8, 8)

LOAD_IN_FRESH_PROCESS = """
import sys, torch
model = torch.jit.load(sys.argv[1])
images = torch.load(sys.argv[2])
torch.save(model(images), sys.argv[3])
assert set(m for m in sys.modules if m.split('.')[0] in ('common', 'server', 'client', 'flwr')) == set()
"""


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    student, teacher = build_student(SHAPE, 10), build_teacher(SHAPE, 10)
    save_checkpoint(student, tmp_path / "student.safetensors")
    save_checkpoint(teacher, tmp_path / "global.safetensors")
    return student, deployment_report(teacher, student, SHAPE, tmp_path), tmp_path


def test_torchscript_student_predicts_the_same_in_a_process_that_imports_only_torch(exported):
    student, report, folder = exported
    images = torch.randn(16, *SHAPE)
    torch.save(images, folder / "images.pt")
    subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(folder / "student.pt"), str(folder / "images.pt"),
         str(folder / "logits.pt")],
        check=True, cwd=folder,  # not the repo: project modules are not importable there
    )
    with torch.no_grad():
        expected = student.eval()(images)
    assert torch.allclose(torch.load(folder / "logits.pt"), expected, atol=1e-5)
    assert report["student"]["files"]["torchscript"]["megabytes"] > 0


def test_report_gives_latency_and_files_of_both_models(exported):
    _, report, _ = exported
    assert report["student"]["latency-ms"] > 0 and report["teacher"]["latency-ms"] > 0
    assert report["teacher"]["files"]["safetensors"]["megabytes"] > report["student"]["files"]["safetensors"]["megabytes"]


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="optional onnx extra not installed")
def test_onnx_student_predicts_the_same_for_any_batch_size(exported):
    import onnx
    from onnx.reference import ReferenceEvaluator

    student, report, folder = exported
    onnx.checker.check_model(str(folder / "student.onnx"))
    images = torch.randn(5, *SHAPE)
    (logits,) = ReferenceEvaluator(str(folder / "student.onnx")).run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, student.eval()(images).numpy(), atol=1e-4)
    assert report["student"]["files"]["onnx"]["path"] == "student.onnx"
    assert sorted(p.name for p in folder.glob("student.onnx*")) == ["student.onnx"]  # weights inside

