"""report.png: every run ends with a picture of its accuracy, loss and time per round, drawn from metrics.jsonl."""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.data import Dataset
from common.models import build_teacher
from server.report_plot import plot_run, series
from server.reporting import RunReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_rows(rounds: int = 3, first: int = 0, student: bool = True, clients: bool = True) -> list[dict]:
    """Lines as RunReport.record_round writes them: round 0 = initial models, then one per round."""
    rows = []
    for r in range(first, first + rounds):
        row: dict = {"round": r, "teacher": {"accuracy": 0.1 + 0.25 * r, "loss": 2.3 / (1 + r)},
                     "server-eval-seconds": 0.4 + 0.01 * r, "round-seconds": 1.0 if r == 0 else 9.0 + r}
        if student:
            row["student"] = {"accuracy": 0.1 + 0.2 * r, "loss": 2.3 / (1 + 0.8 * r)}
        if r >= 1:
            row["train-seconds"] = 6.0 + r
            row["client-metrics"] = {"train-seconds": 4.0, "eval-seconds": 0.5, "num-examples": 300}
            if clients:
                row["clients"] = [{"node-id": 1, "train-seconds": 3.0, "eval-seconds": 0.5},
                                  {"node-id": 2, "train-seconds": 5.0 + r, "eval-seconds": 0.6}]
            if student:
                row["distill"] = {"seconds": 1.5, "steps": 50, "loss": 0.7}
        rows.append(row)
    return rows


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which follows the signature."""
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def metrics_file(tmp_path) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in metrics_rows()))
    return path


def test_the_report_is_a_png_of_at_least_800_by_600_pixels(metrics_file, tmp_path):
    plot_run(read_metrics(metrics_file), "digits, distill global, fedavg", tmp_path / "report.png")
    data = (tmp_path / "report.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert 20_000 < len(data) < 2_000_000
    width, height = png_size(data)
    assert width >= 800 and height >= 600


def test_the_plotted_curves_are_the_metrics_lines(metrics_file, tmp_path):
    rows = read_metrics(metrics_file)
    drawn = plot_run(rows, "title", tmp_path / "report.png")
    assert drawn == series(rows)
    assert drawn.rounds == [0, 1, 2]
    assert drawn.teacher_accuracy == [row["teacher"]["accuracy"] for row in rows]
    assert drawn.teacher_loss == [row["teacher"]["loss"] for row in rows]
    assert drawn.student_accuracy == [row["student"]["accuracy"] for row in rows]
    assert drawn.student_loss == [row["student"]["loss"] for row in rows]


def test_the_time_split_is_slowest_client_distillation_server_eval_and_the_rest_of_the_round(metrics_file):
    rows = read_metrics(metrics_file)
    split = series(rows)
    assert split.time_rounds == [1, 2]  # round 0 trains nothing
    trained = rows[1:]
    assert split.client_seconds == [max(c["train-seconds"] + c["eval-seconds"] for c in r["clients"]) for r in trained]
    assert split.distill_seconds == [r["distill"]["seconds"] for r in trained]
    assert split.server_eval_seconds == [r["server-eval-seconds"] for r in trained]
    for i, row in enumerate(trained):
        assert split.overhead_seconds[i] >= 0
        parts = split.client_seconds[i] + split.distill_seconds[i] + split.server_eval_seconds[i]
        assert parts + split.overhead_seconds[i] == pytest.approx(row["round-seconds"])


def test_without_per_client_lines_the_clients_mean_times_stand_in_and_overhead_never_goes_negative():
    row = metrics_rows(2, clients=False)[1]
    row["round-seconds"] = 1.0  # less than its parts: clock skew, or a resumed round's short first line
    split = series([row])
    assert split.client_seconds == [4.5]  # client-metrics train-seconds + eval-seconds
    assert split.overhead_seconds == [0.0]


@pytest.mark.parametrize("rows", [
    pytest.param(metrics_rows(student=False), id="distill-off"),
    pytest.param(metrics_rows(1), id="round-0-only"),
    pytest.param(metrics_rows(2, first=1), id="one-trained-round-only"),
    pytest.param(metrics_rows(clients=False), id="no-clients-lines"),
    pytest.param(metrics_rows(3, first=3), id="resumed-after-round-2"),
    pytest.param(metrics_rows(2) + metrics_rows(2, first=5), id="gap-in-rounds"),
    pytest.param([{"round": 0, "teacher": {"accuracy": 0.1, "loss": 2.3}}, {"round": 1}], id="bare-lines"),
])
def test_any_run_still_plots(rows, tmp_path):
    drawn = plot_run(rows, "title", tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    assert drawn.rounds == sorted(r["round"] for r in rows)
    assert drawn.has_student == any("student" in r for r in rows)


@pytest.fixture
def finished_report(tmp_path, config):
    """A RunReport after three rounds without distillation, on a tiny test set, ready to finish."""
    test_set = Dataset("tiny", torch.randn(4, 1, 8, 8), torch.arange(4), tuple("abcd"))
    report = RunReport(replace(config, distill="off"), tmp_path / "run", test_set, torch.device("cpu"))
    report.rows = metrics_rows(student=False)
    return report, build_teacher(test_set.input_shape, test_set.num_classes)


def test_finish_writes_report_png_and_names_it_in_the_summary(finished_report, caplog):
    report, teacher = finished_report
    with caplog.at_level(logging.INFO, logger="flwr"):
        summary = report.finish(teacher, None)
    png = report.run_dir / "report.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert summary["report"] == str(png)
    assert json.loads((report.run_dir / "summary.json").read_text())["report"] == str(png)
    assert f"report: {png}" in caplog.text  # in the end-of-run table


def test_a_plot_that_fails_costs_only_the_picture(finished_report, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("server.report_plot.plot_run", broken)
    report, teacher = finished_report
    with caplog.at_level(logging.WARNING, logger="flwr"):
        report.finish(teacher, None)
    summary = json.loads((report.run_dir / "summary.json").read_text())
    assert "report" not in summary and summary["rounds"] == 2
    assert not (report.run_dir / "report.png").exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("report.png" in r.getMessage() and "no fonts" in r.getMessage() for r in warnings)


def test_the_round_line_says_which_model_fusion_kept_and_who_decided(config, tmp_path):
    report = RunReport(config, tmp_path / "run", test_set=None, device=torch.device("cpu"))
    row = {"round": 2, "teacher": {"accuracy": 0.5}, "distill": {"seconds": 1.0, "global": {"kept-step": 0}},
           "fusion": {"kept": "averaged", "by": "proxy"}}
    assert "(averaged model kept)" in report.progress_line(row)
    row["distill"]["global"]["kept-step"], row["fusion"]["kept"] = 40, "fused"
    assert "(fused, step 40 kept)" in report.progress_line(row)
    row["fusion"] = {"kept": "averaged", "by": "clients", "accuracy": {"averaged": 0.9, "fused": 0.8},
                     "answered": 9, "asked": 10}
    assert "(averaged kept: clients' acc 0.900 vs fused 0.800, 9/10 nodes)" in report.progress_line(row)
    row["fusion"] = {"kept": "averaged", "by": "clients", "accuracy": {"averaged": 0.5}, "answered": 1, "asked": 1}
    assert "(averaged kept: clients' acc 0.500, 1/1 nodes)" in report.progress_line(row)
    row["fusion"] = {"kept": "fused", "by": "proxy", "asked": 10, "answered": 0, "accuracy": {}}
    assert "no valid check reply from 10 nodes: the proxy criterion kept the fused model" in report.progress_line(row)
    del row["fusion"]
    assert "kept" not in report.progress_line(row)


def test_rounds_whose_fusion_kept_the_averaged_model_are_marked_and_the_check_is_timed_apart(tmp_path):
    rows = metrics_rows(3)
    rows[1]["fusion"] = {"kept": "averaged", "by": "clients", "seconds": 0.7}
    rows[2]["fusion"] = {"kept": "previous", "by": "clients", "seconds": 0.5}
    data = plot_run(rows, "fusion", tmp_path / "report.png")
    assert data.averaged_kept == [1] and data.previous_kept == [2] and data.check_seconds == [0.7, 0.5]
    plain = series(metrics_rows(3))
    assert plain.averaged_kept == [] and plain.check_seconds == [0.0, 0.0]
    assert data.overhead_seconds == pytest.approx([o - c for o, c in zip(plain.overhead_seconds, (0.7, 0.5))])
    assert png_size((tmp_path / "report.png").read_bytes()) == (1200, 900)


def test_with_model_families_each_family_past_the_first_gets_its_own_accuracy_line(tmp_path):
    rows = [{"round": r, "teacher": {"accuracy": 0.1 * r, "loss": 2.0 - r},
             "families": {"large": {"accuracy": 0.1 * r, "loss": 2.0 - r},
                          "small": {"accuracy": 0.2 * r, "loss": 1.5 - r}}} for r in range(3)]
    data = plot_run(rows, "families", tmp_path / "report.png")
    assert data.first_family == "large" and list(data.families) == ["small"]
    assert data.families["small"]["accuracy"] == [0.0, 0.2, 0.4]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert series(rows[:1] + [{"round": 1, "teacher": {"accuracy": 0.5}}]).families["small"]["accuracy"] == [0.0, None]
