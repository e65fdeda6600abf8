"""The GPU check a GPU machine runs in one command: its wheel folder is complete, its dry run passes here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts import gpu_wheels
from scripts.launch import REPO


def test_the_wheel_list_carries_flower_and_its_needs_but_not_what_the_gpu_machine_has():
    needed = gpu_wheels.needed()
    assert {"flwr", "grpcio", "cryptography", "fastapi", "mlxtend"} <= set(needed)
    assert needed["flwr"].startswith("1.39.")
    assert not {"torch", "numpy", "scikit-learn", "uv", "ray"} & set(needed)
    assert "ray" in gpu_wheels.needed(with_ray=True)


def fake_folder(tmp_path, tag: str = "py3-none-any", skip: str = "", extra: tuple[str, ...] = (),
                with_ray: bool = False):
    """Empty files named as the wheels ``needed(with_ray)`` lists (tags ``tag``), less ``skip``, plus ``extra``."""
    folder = tmp_path / "wheels"
    folder.mkdir(parents=True)
    for name, version in gpu_wheels.needed(with_ray).items():
        if name != skip:
            (folder / f"{name.replace('-', '_')}-{version}-{tag}.whl").touch()
    for name in ("fl_distill-0.1.0-py3-none-any.whl", *extra):
        (folder / name).touch()
    return folder


def test_a_complete_folder_passes_and_each_gap_is_named(tmp_path):
    assert gpu_wheels.check(fake_folder(tmp_path)) == []
    assert gpu_wheels.check(fake_folder(tmp_path / "a", skip="grpcio")) == [
        f"grpcio=={gpu_wheels.needed()['grpcio']}: no wheel"]
    problems = gpu_wheels.check(fake_folder(tmp_path / "b", extra=("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                                                      "flwr-1.38.0-py3-none-any.whl")))
    assert "torch: not needed (the GPU machine has it, or it is not carried)" in problems
    assert "flwr: 2 wheels; keep one" in problems


def test_a_folder_prepared_with_ray_passes_the_check_the_dry_run_makes_whatever_its_size(tmp_path):
    folder = fake_folder(tmp_path, with_ray=True)
    ray = next(folder.glob("ray-*.whl"))
    with ray.open("wb") as f:  # a sparse 70 MiB file: as large as the real wheel, no disk used
        f.truncate(70 * 2**20)
    assert gpu_wheels.check(folder) == []  # what scripts/gpu-check.sh --dry-run runs: no --with-ray
    ray.unlink()
    assert gpu_wheels.check(folder) == [f"{name}: not needed (the GPU machine has it, or it is not carried)"
                                        for name in sorted(set(gpu_wheels.needed(True)) - set(gpu_wheels.needed()))
                                        if name != "ray"]


def test_a_wheel_for_another_python_or_platform_is_refused(tmp_path):
    for tag in ("cp311-cp311-manylinux_2_17_x86_64", "cp312-cp312-macosx_11_0_arm64"):
        folder = fake_folder(tmp_path / tag, extra=(f"grpcio_x-1.0-{tag}.whl",))
        assert gpu_wheels.check(folder) == [f"grpcio_x-1.0-{tag}.whl is not for CPython 3.12 on x86_64 Linux"]
    # a stable-ABI wheel built for an older CPython installs on 3.12
    folder = fake_folder(tmp_path / "abi3", skip="cryptography")
    (folder / f"cryptography-{gpu_wheels.needed()['cryptography']}-cp311-abi3-manylinux_2_28_x86_64.whl").touch()
    assert gpu_wheels.check(folder) == []


def test_the_dry_run_collects_every_gpu_test_as_skipped_and_runs_the_benchmark_smoke(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run", "--wheels", "none", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry-run"] and len(summary["tests"]) >= 5 and set(summary["tests"].values()) == {"skipped"}
    rates = summary["figures"]["datasets"]["digits"]["local-training"]["images-per-second"]
    assert set(rates) == {"clientapp", "plain", "plain, batch copied"} and min(rates.values()) > 0
    assert "a real run executes:" in result.stdout and "bench.gpu --json" in result.stdout


def test_the_check_refuses_a_missing_wheel_folder_naming_the_command_that_makes_it(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu-check.sh", "--wheels", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                                      "PYTHON": sys.executable})
    assert result.returncode == 2 and "python -m scripts.gpu_wheels prepare" in result.stderr


@pytest.mark.skipif(not (REPO / ".whl").is_dir(), reason="no prepared wheel folder .whl here (prepare needs an index)")
def test_the_prepared_wheel_folder_is_complete_and_small():
    assert gpu_wheels.check(REPO / ".whl") == []
