"""The models on the devices: build the delivered files once, send them to every connected SuperNode, collect
what each measured there.

Delivery is a Flower message like any other (``query.deliver``, handled by
``client/client_app.py`` ``receive_models``), so it travels inside the run, over
the SuperLink's TLS channel to authenticated SuperNodes, with the round timeout
as TTL. The files are built on the server and shipped as bytes: one export and
one int8 calibration (on the proxy set, which only the server holds) for every
node, and the SHA-256 in the manifest is the server's, so a node checks that it
holds exactly what the server sent. A node that does not answer, or answers an
error, is a row with its reason; the run goes on.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from torch import nn

from common.config import RunConfig
from common.data import SHAPES_AND_CLASSES
from common.model_package import PREPROCESSING, describe_files
from server import quantization
from server.export import export_onnx, export_torchscript

MESSAGE_TYPE = "query.deliver"


def delivered_models(config: RunConfig, has_student: bool) -> tuple[str, ...]:
    """Which models ``deliver`` names: 'auto' is the student when the run trains one, else the global model."""
    choice = config.deliver
    if choice == "auto":
        choice = "student" if has_student else "global"
    return {"student": ("student",), "global": ("global",), "both": ("student", "global"), "none": ()}[choice]


def export_files(models: dict[str, nn.Module], input_shape: tuple[int, int, int], folder: Path,
                 calibration: torch.Tensor) -> dict[str, dict[str, Path]]:
    """{model: {format: path}} of the files to deliver, exported into ``folder`` unless already there.

    ``student`` and ``global`` get TorchScript (``.pt``) and, with the onnx extra, ONNX; the student also
    its int8 version (``student-int8``, calibrated on ``calibration``, the proxy set's images).
    """
    files: dict[str, dict[str, Path]] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        paths = {"torchscript": folder / f"{name}.pt", "onnx": folder / f"{name}.onnx"}
        if not paths["torchscript"].exists():
            export_torchscript(model, input_shape, paths["torchscript"])
        if not paths["onnx"].exists() and export_onnx(model, input_shape, paths["onnx"]) is None:
            del paths["onnx"]
        files[name] = paths
        if name == "student" and "onnx" in paths and quantization.available():
            int8 = folder / "student.int8.onnx"
            if int8.exists() or quantization.quantize_int8(paths["onnx"], calibration, int8) is not None:
                files["student-int8"] = {"onnx": int8}
    return files


def build_package(files: dict[str, dict[str, Path]], accuracies: dict[str, float], run_id: int, server_round: int,
                  config: RunConfig) -> tuple[dict[str, bytes], dict]:
    """The bytes of every file and the manifest that describes them (``common/model_package.py``)."""
    blobs = {path.name: path.read_bytes() for paths in files.values() for path in paths.values()}
    shape, class_names = SHAPES_AND_CLASSES[config.dataset]
    manifest = {
        "run-id": run_id, "round": server_round, "dataset": config.dataset, "input-shape": list(shape),
        "class-names": list(class_names), "preprocessing": PREPROCESSING,
        "models": {name: {"files": {kind: path.name for kind, path in paths.items()},
                          "server-test-accuracy": accuracies.get(name)} for name, paths in files.items()},
        "files": describe_files(blobs),
    }
    return blobs, manifest


def deliver(grid: Grid, placements: dict[int, tuple[int, int]], blobs: dict[str, bytes], manifest: dict,
            timeout: float, model_dirs: dict[int, str] | None = None) -> list[dict]:
    """Send the package to every node in ``placements`` ({node ID: (partition, partitions)}); one row per node.

    ``model_dirs`` suggests a model folder per node (simulation: one per virtual node under the run folder);
    a node's own ``model-dir`` wins. Each row: node ID, status ('installed', 'failed', 'error reply',
    'no answer'), the cause, and what the node measured (``client/delivery.py``).
    """
    messages = []
    for node, (partition, partitions) in placements.items():
        config = {"partition-id": partition, "num-partitions": partitions, "server-round": manifest["round"]}
        if model_dirs and node in model_dirs:
            config["default-model-dir"] = model_dirs[node]
        content = RecordDict({"config": ConfigRecord(config), "files": ConfigRecord(dict(blobs)),
                              "manifest": ConfigRecord({"json": json.dumps(manifest)})})
        messages.append(Message(content, dst_node_id=node, message_type=MESSAGE_TYPE, ttl=timeout))
    started = time.perf_counter()
    replies = {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(messages, timeout=timeout)}
    log(INFO, "fl-distill: delivered %d file(s) to %d node(s) in %.1f s", len(blobs), len(messages),
        time.perf_counter() - started)
    rows = sorted((device_row(node, placements[node], replies.get(node), list(manifest["models"]))
                   for node in placements), key=lambda row: (row["partition"], row["node-id"]))
    for row in rows:
        if row["status"] != "installed":
            log(WARNING, "fl-distill: node %d has no new model: %s: %s", row["node-id"], row["status"], row["error"])
    return rows


def device_row(node: int, placement: tuple[int, int], reply: Message | None, models: list[str]) -> dict:
    """What one node answered, flattened for devices.json.

    ``partition`` is the node's own answer when it replied (its ``partition-id`` wins over the server's
    hand-out ``placement``; -1: it trains on a ``data-dir``), else the placement.
    """
    row = {"node-id": node, "partition": placement[0], "status": "no answer", "error": "", "models": {}}
    if reply is None:
        row["error"] = "no reply within round-timeout"
        return row
    if reply.has_error():
        row.update(status="error reply", error=reply.error.reason)
        return row
    result, metrics = dict(reply.content["result"]), dict(reply.content["metrics"])
    runtimes = json.loads(str(result.pop("runtimes", "{}")))
    row.update(result)
    row["num-examples"] = int(metrics.get("num-examples", 0))
    for name in models:
        figures = {key[len(name) + 1:]: value for key, value in metrics.items()
                   if key.startswith(f"{name}-") and not key[len(name) + 1:].startswith("int8")}
        row["models"][name] = {"runtime": runtimes.get(name, "-"), **figures}
    return row


def device_table(rows: list[dict]) -> str:
    """One line per node and model: where it ran, how fast, how well, how big."""
    header = (f"{'node':>20} {'data':<14} {'model':<12} {'runtime':<11} {'ms b1':>7} {'ms b32':>7} "
              f"{'local acc':>9} {'KB':>7}  status")
    lines = [header, "-" * len(header)]
    for row in rows:
        own_folder = row["partition"] < 0 or "data-dir" in row.get("data", "")
        data = "data-dir" if own_folder else f"partition {row['partition']}"
        if not row["models"] or row["status"] != "installed":
            lines.append(f"{row['node-id']:>20} {data:<14} {'-':<12} {'-':<11} {'-':>7} {'-':>7} {'-':>9} {'-':>7}  "
                         f"{row['status']}: {row['error']}")
            continue
        for name, m in row["models"].items():
            if name == "global" and row.get("model-family"):
                name = f"global-{row['model-family']}"
            def number(key: str, fmt: str) -> str:
                return format(m[key], fmt) if key in m else "-"
            kb = format(m["bytes"] / 1e3, ".0f") if "bytes" in m else "-"
            lines.append(f"{row['node-id']:>20} {data:<14} {name:<12} {m['runtime'][:11]:<11} "
                         f"{number('latency-ms-b1', '.3f'):>7} {number('latency-ms-b32', '.3f'):>7} "
                         f"{number('accuracy', '.4f'):>9} {kb:>7}  {row['status']}")
    if rows and (device := rows[0].get("device")):
        lines.append(f"device of node {rows[0]['node-id']}: {device}; local accuracy is on each node's own data, "
                     "which its partition's client trained on")
    return "\n".join(lines)


class Delivery:
    """Sends a run's models to its nodes: at the end, and every ``deliver-every`` rounds (0: at the end only).

    Args:
        config: the run config (``deliver``, ``deliver-every``, ``round-timeout``).
        run_id, run_dir: the run, and its output folder (the final files are exported there).
        calibration: proxy-set images for the int8 student; test_set: the server's test set (its shape, and
            the int8 student's test accuracy for the manifest).
        simulation: the nodes are virtual: each gets a model folder of its own under ``run_dir/devices``.
    """

    def __init__(self, config: RunConfig, run_id: int, run_dir: Path, calibration: torch.Tensor, test_set,
                 simulation: bool):
        self.config, self.run_id, self.run_dir = config, run_id, run_dir
        self.calibration, self.test_set, self.simulation = calibration, test_set, simulation

    def due(self, server_round: int) -> bool:
        """Whether a round before the last delivers (``deliver-every``)."""
        every = self.config.deliver_every
        return bool(every) and server_round % every == 0 and server_round < self.config.num_server_rounds

    def send(self, grid: Grid, strategy, server_round: int, models: dict[str, nn.Module],
             accuracies: dict[str, float], folder: Path,
             families: dict[str, tuple[nn.Module, float]] | None = None) -> tuple[list[dict], float]:
        """Export ``models`` into ``folder``, deliver them to every connected node; (rows, seconds).

        ``families``: {model family: (its global model, its test accuracy)} for the run's families past the
        first; their nodes get that family's model as ``global`` (exported into ``folder/family-<name>``).
        """
        started = time.perf_counter()
        placements = {node: place for node, place in strategy.placements(grid).items()
                      if node not in strategy.left_out}  # nodes of a family this run does not federate
        rows = []
        for family, group in _by_family(strategy, placements, families or {}).items():
            chosen, scores, into = models, accuracies, folder
            if family in (families or {}) and "global" in models:
                chosen = {**models, "global": families[family][0]}
                scores, into = {**accuracies, "global": families[family][1]}, folder / f"family-{family}"
            files = export_files(chosen, self.test_set.input_shape, into, self.calibration)
            if "student-int8" in files and scores.get("student-int8") is None:
                scores["student-int8"] = accuracies["student-int8"] = quantization.onnx_accuracy(
                    files["student-int8"]["onnx"], self.test_set.images, self.test_set.labels)
            blobs, manifest = build_package(files, scores, self.run_id, server_round, self.config)
            if family and "global" in manifest["models"]:  # several families: say which one this node's global is
                manifest["models"]["global"]["model-family"] = family
            dirs = None
            if self.simulation:
                dirs = {node: str((self.run_dir / "devices" / f"partition-{p}").resolve())
                        for node, (p, _) in group.items()}
            delivered = deliver(grid, group, blobs, manifest, self.config.round_timeout, dirs)
            rows += [{**row, "model-family": family} if family else row for row in delivered]
        for row in rows:
            row["round"] = server_round
        return sorted(rows, key=lambda row: (row["partition"], row["node-id"])), time.perf_counter() - started


def _by_family(strategy, placements: dict[int, tuple[int, int]], families: dict) -> dict[str, dict]:
    """``placements`` split by the nodes' model family: one group unless ``families`` names others."""
    if not families:
        return {"": placements}
    groups: dict[str, dict] = {}
    for node, place in placements.items():
        groups.setdefault(strategy.aggregator.family(node), {})[node] = place
    return groups
