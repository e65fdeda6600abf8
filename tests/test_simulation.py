"""Integration: the app under Flower's simulation engine, driven as a user would (`flwr run`)."""

import json

import pytest

from scripts import launch

pytestmark = pytest.mark.slow
CONNECTION = "test-sim"


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A simulation SuperLink for this module's runs, stopped afterwards whatever happens."""
    home = tmp_path_factory.mktemp("flwr-home")
    launch.write_connection(home, CONNECTION, launch.Ports().address)
    process = launch.start_superlink(home, launch.Ports(), simulation=True)
    yield home
    launch.stop([process])


def simulate(home, run_config: str, clients: int = 3) -> tuple[int, str, list[str]]:
    lines: list[str] = []
    run_id = launch.flwr_run(home, CONNECTION, run_config, f"num-supernodes={clients}", echo=lines.append)
    return run_id, launch.wait_finished(home, CONNECTION, run_id, timeout=60), lines


def test_two_rounds_with_distillation_complete_and_write_outputs(superlink, tmp_path):
    out = tmp_path / "out"
    run_id, status, _ = simulate(superlink, f'num-server-rounds=2 out-dir="{out}"')
    assert status == "finished:completed"
    run_dir = out / str(run_id)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["teacher"]["accuracy"] > rows[0]["teacher"]["accuracy"]
    assert rows[2]["student"]["accuracy"] > rows[0]["student"]["accuracy"]
    assert len(rows[1]["clients"]) == 3 and rows[1]["distill"]["student"]["steps"] > 0
    assert (run_dir / "global.safetensors").stat().st_size > (run_dir / "student.safetensors").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["student"]["parameters"] < summary["teacher"]["parameters"]


def test_bad_config_stops_the_run_at_start_with_a_clear_message(superlink, tmp_path):
    _, status, lines = simulate(superlink, f'dataset="imagenet" out-dir="{tmp_path / "out"}"')
    assert status.startswith("finished:") and status != "finished:completed"
    log = "\n".join(lines)
    assert "'dataset' = 'imagenet' is not allowed" in log and "'cifar10'" in log
    assert "Traceback" not in log
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mode", ['distill="off"', 'distill="ensemble" distill-target="student"', 'distill="ensemble" distill-target="both"']
)
def test_every_distillation_mode_completes(superlink, tmp_path, mode):
    out = tmp_path / "out"
    run_id, status, _ = simulate(superlink, f'{mode} num-server-rounds=1 distill-steps=20 out-dir="{out}"', clients=2)
    assert status == "finished:completed"
    summary = json.loads((out / str(run_id) / "summary.json").read_text())
    assert ("student" in summary) == ("off" not in mode)
    assert (out / str(run_id) / "student.pt").exists() == ("off" not in mode)
