"""Per-round test metrics, checkpoints and the end-of-run summary.

Everything lands in ``<out-dir>/<run-id>/``: ``metrics.jsonl`` (a line per
round, round 0 = the initial models), ``global.safetensors`` and
``student.safetensors`` (rewritten each round), ``resume.pt`` (``server/checkpoint.py``), ``summary.json``,
``report.png`` (accuracy, loss and time per round; ``server/report_plot.py``), and the exported student
(``student.pt``, ``student.onnx`` with the onnx extra).
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from safetensors.torch import save_file
from torch import nn

from common.config import RunConfig
from common.data import Dataset
from common.models import model_size
from common.training import evaluate
from server.export import deployment_report, family_report


def _parsed(line: str) -> dict | None:
    """A metrics line, or None for one a crash cut short (it is dropped on resume)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        log(WARNING, "fl-distill: dropping an incomplete metrics line: %.80s", line)
        return None


def save_checkpoint(model: nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


class RunReport:
    """Evaluates teacher and student on the test set each round and writes the run's files."""

    def __init__(self, config: RunConfig, run_dir: Path, test_set: Dataset, device: torch.device,
                 resume_after: int = 0):
        """``resume_after`` > 0: continue the run in ``run_dir`` after that round (its later lines are dropped)."""
        self.config = config
        self.run_dir = run_dir
        self.test_set = test_set
        self.device = device
        self.resume_after = resume_after
        self.rows: list[dict] = []
        self.started = self.last_recorded = time.perf_counter()
        if resume_after:
            metrics = run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            self.rows = [row for row in map(_parsed, lines) if row is not None and row["round"] <= resume_after]
            metrics.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        else:
            run_dir.mkdir(parents=True, exist_ok=False)

    def record_updates(self, updates: dict) -> None:
        """``update-partition-<p>.safetensors``: the latest update of each client ``record-updates`` names, as the
        server received it (``updates``: {partition: ArrayRecord}); for membership audits (``bench/privacy_audit.py``)."""
        for partition, arrays in updates.items():
            save_file({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
                      str(self.run_dir / f"update-partition-{partition}.safetensors"))

    def record_round(self, server_round: int, teacher: nn.Module, student: nn.Module | None, stats: dict,
                     families: dict[str, nn.Module] | None = None) -> MetricRecord:
        """Test the models, append a metrics line, refresh the checkpoints, log one line.

        ``families``: {model family: its global model}, ``teacher`` (the first family's) included; with more
        than one, the line's ``families`` gives each one's test accuracy and loss beside the round's
        per-family ``stats['families']`` (nodes, bytes, fusion), and ``global-<family>.safetensors`` is written.
        """
        started = time.perf_counter()
        row = {"round": server_round, "teacher": evaluate(teacher, self.test_set, self.device)}
        others = dict(list((families or {}).items())[1:])  # the first family's model is the teacher
        tested = {family: evaluate(model, self.test_set, self.device) for family, model in others.items()}
        if student is not None:
            row["student"] = evaluate(student, self.test_set, self.device)
        save_checkpoint(teacher, self.run_dir / "global.safetensors")
        for family, model in others.items():
            save_checkpoint(model, self.run_dir / f"global-{family}.safetensors")
        if student is not None:
            save_checkpoint(student, self.run_dir / "student.safetensors")
        now = time.perf_counter()
        row["server-eval-seconds"] = now - started
        row["round-seconds"] = now - self.last_recorded  # since the previous round's line
        self.last_recorded = now
        row.update(stats)
        if others:
            tested = {next(iter(families)): row["teacher"], **tested}
            row["families"] = {family: {**scores, **stats.get("families", {}).get(family, {})}
                               for family, scores in tested.items()}
        self.rows.append(row)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(INFO, "%s", self.progress_line(row))
        flat = {f"teacher-{k}": v for k, v in row["teacher"].items()}
        flat.update({f"student-{k}": v for k, v in row.get("student", {}).items()})
        return MetricRecord(flat)

    def progress_line(self, row: dict) -> str:
        line = f"round {row['round']}/{self.config.num_server_rounds}  teacher acc {row['teacher']['accuracy']:.3f}"
        if "student" in row:
            line += f"  student acc {row['student']['accuracy']:.3f}"
        if "train-seconds" in row:
            line += f"  | round {row['round-seconds']:.1f}s: train {row['train-seconds']:.1f}s"
        if "distill" in row:
            line += f"  distill {row['distill']['seconds']:.1f}s"
            if "fusion" in row:
                line += f" ({fusion_text(row['fusion'], row['distill'].get('global', {}).get('kept-step'))})"
        if "families" in row:
            line += "  | " + ", ".join(f"{family} acc {f['accuracy']:.3f} ({f.get('valid', 0)} nodes)"
                                       for family, f in row["families"].items())
        if "privacy" in row:
            line += f"  | {privacy_text(row['privacy'])}"
        if "eval-accuracy" in row.get("client-metrics", {}):
            line += f"  | clients' local acc before training {row['client-metrics']['eval-accuracy']:.3f}"
        return line

    def finish(self, teacher: nn.Module, student: nn.Module | None, calibration: torch.Tensor | None = None,
               families: dict[str, nn.Module] | None = None) -> dict:
        """Export the student, write summary.json, log the summary table; returns the summary.

        ``calibration``: proxy-set images (N, C, H, W) for the int8 student's activation ranges.
        ``families``: as in :meth:`record_round`; with more than one, ``summary['families']`` gives each
        family's final test figures and size, and every family but the first is exported as the student is
        (``global-<family>.pt`` / ``.onnx``).
        """
        last = self.rows[-1]
        summary = {
            "rounds": last["round"],
            "seconds": round(time.perf_counter() - self.started, 2),
            "teacher": {**last["teacher"], **vars(model_size(teacher))},
            "config": self.config.to_mapping(),
        }
        if self.resume_after:
            summary["resumed-after-round"] = self.resume_after
        if families and len(families) > 1:
            summary["families"] = {
                family: {**last["families"][family], **vars(model_size(model)),
                         **(family_report(model, self.test_set.input_shape, self.run_dir, f"global-{family}")
                            if model is not teacher else {})}
                for family, model in families.items()}
        privacy = [row["privacy"] for row in self.rows if "privacy" in row]
        if privacy:
            summary["privacy"] = privacy[-1]
        if student is not None:
            summary["student"] = {**last["student"], **vars(model_size(student))}
            deployment = deployment_report(teacher, student, self.test_set.input_shape, self.run_dir,
                                           calibration, self.test_set)
            for name in ("teacher", "student"):
                summary[name].update(deployment[name])
            if "student-int8" in deployment:
                summary["student-int8"] = {**deployment["student-int8"], "parameters": summary["student"]["parameters"]}
        try:  # the picture is a nicety: never lose summary.json over it
            from server.report_plot import plot_run

            c = self.config
            distill = c.distill if c.distill != "ensemble" else f"ensemble -> {c.distill_target}"
            plot_run(self.rows, f"fl-distill {self.run_dir.name}: {c.dataset}, {c.partitioning}, distill {distill}, "
                     f"aggregation {c.aggregation}", self.run_dir / "report.png")
            summary["report"] = str(self.run_dir / "report.png")
        except Exception as e:  # noqa: BLE001
            log(WARNING, "fl-distill: could not draw report.png: %s: %s", type(e).__name__, e)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        for line in summary_table(summary).splitlines():
            log(INFO, "%s", line)
        log(INFO, "outputs in %s", self.run_dir)
        return summary


    def record_delivery(self, rows: list[dict], seconds: float) -> None:
        """Write ``devices.json`` (one row per node), point ``summary.json`` to it, log the device table."""
        from server.delivery import device_table

        path = self.run_dir / "devices.json"
        path.write_text(json.dumps(rows, indent=2))
        installed = sum(row["status"] == "installed" for row in rows)
        summary_path = self.run_dir / "summary.json"
        if summary_path.exists():  # the end of the run; a delivery every few rounds comes before it
            summary = json.loads(summary_path.read_text())
            summary.update({"devices": str(path), "delivery-seconds": round(seconds, 2), "delivered-to": installed,
                            "nodes": len(rows)})
            summary_path.write_text(json.dumps(summary, indent=2))
        log(INFO, "fl-distill: models installed on %d of %d node(s) in %.1f s; devices: %s",
            installed, len(rows), seconds, path)
        for line in device_table(rows).splitlines():
            log(INFO, "%s", line)


def fusion_text(fusion: dict, kept_step: int | None = None) -> str:
    """'fused kept: clients' acc 0.912 vs averaged 0.887, previous 0.850, 10/10 nodes': which model went on, and why."""
    if fusion["by"] == "clients":
        others = ", ".join(f"{name} {acc:.3f}" for name, acc in fusion["accuracy"].items() if name != fusion["kept"])
        return (f"{fusion['kept']} kept: clients' acc {fusion['accuracy'][fusion['kept']]:.3f}"
                f"{' vs ' + others if others else ''}, {fusion['answered']}/{fusion['asked']} nodes")
    if "asked" in fusion:
        return f"no valid check reply from {fusion['asked']} nodes: the proxy criterion kept the {fusion['kept']} model"
    if fusion["kept"] == "averaged":
        return "averaged model kept"
    return f"fused, step {kept_step} kept" if kept_step is not None else "fused model kept"


def privacy_text(privacy: dict) -> str:
    """'ε 3.54 (δ 0.001, central DP, client-level)': the privacy spent so far, for log lines.

    Client-level (central, local): whether a client took part; example-level: whether one example of
    a client's data did, for the worst client (rows before ``unit`` existed: local read per client)."""
    unit = privacy.get("unit", "client")
    worst = ", worst client" if privacy["mechanism"] in ("local", "example") else ""
    return f"ε {privacy['epsilon']:.3g} (δ {privacy['delta']:.3g}, {privacy['mechanism']} DP, {unit}-level{worst})"


def summary_table(summary: dict) -> str:
    """The end-of-run table: one row per model, with the ε spent when the run used DP."""
    privacy = summary.get("privacy")
    header = f"{'model':<12} {'test acc':>8} {'ε':>7} {'test loss':>9} {'params':>10} {'MB':>6} {'ms/sample':>9}"
    lines = [f"fl-distill: {summary['rounds']} rounds in {summary['seconds']:.0f}s", header, "-" * len(header)]
    for name in ("teacher", "student", "student-int8"):
        if name in summary:
            m = summary[name]
            latency = f"{m['latency-ms']:>9.3f}" if "latency-ms" in m else f"{'-':>9}"
            epsilon = f"{privacy['epsilon']:>7.3g}" if privacy else f"{'-':>7}"
            loss = f"{m['loss']:>9.4f}" if "loss" in m else f"{'-':>9}"
            lines.append(f"{name:<12} {m['accuracy']:>8.4f} {epsilon} {loss} {m['parameters']:>10,} "
                         f"{m['megabytes']:>6.2f} {latency}")
    for family, m in list(summary.get("families", {}).items())[1:]:  # the first is the teacher's row
        lines.append(f"{'family ' + family:<12} {m['accuracy']:>8.4f} {'-':>7} {m['loss']:>9.4f} {m['parameters']:>10,} "
                     f"{m['megabytes']:>6.2f} " + (f"{m['latency-ms']:>9.3f}" if "latency-ms" in m else f"{'-':>9}"))
    if "families" in summary:
        lines.append(f"teacher: the global model, model family {next(iter(summary['families']))!r}")
    if privacy:
        lines.append(f"privacy: {privacy_text(privacy)} after {privacy['releases']} releases, noise multiplier "
                     f"{privacy['noise-multiplier']:.3g}")
    if "student-int8" in summary:
        m, fp32 = summary["student-int8"], summary["student"]
        lines.append(f"student-int8: {m['size-vs-fp32']:.2f}x the ONNX student's bytes, test acc "
                     f"{m['accuracy'] - fp32['accuracy']:+.4f} against the student; latency with onnxruntime "
                     f"(batch 1, one thread) {m['latency-ms']:.3f} ms vs {fp32['onnx-latency-ms']:.3f} ms (fp32)")
    for family, m in summary.get("families", {}).items():
        if "files" in m:
            files = ", ".join(f"{f['path']} ({f['megabytes']:.2f} MB)" for f in m["files"].values())
            lines.append(f"family {family} files: {files}")
    for name in ("teacher", "student", "student-int8"):
        if "files" in summary.get(name, {}):
            files = ", ".join(f"{f['path']} ({f['megabytes']:.2f} MB)" for f in summary[name]["files"].values())
            lines.append(f"{name} files: {files}")
    if "report" in summary:
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)
