"""The ``query.deliver`` handler's work: install the delivered models on this node, measure them here, reply.

The server sends the files as bytes with their manifest (``server/delivery.py``);
they are written atomically into the node's model folder (node config
``model-dir``; ``common/model_package.py``), then each model is run where it will
serve, with the runtime it would serve with (``client/inference.py``): latency
per sample at batch 1 and 32, and top-1 accuracy on this node's own data (its
partition, which the global model trained on, or its ``data-dir``). Only these
figures go back; the data stays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.inference import NoRuntimeError, device_name, latency_ms, runner
from common.data import Dataset
from common.model_package import ModelPackageError, install

DEFAULT_MODEL_DIR = "models"  # relative to the directory the SuperNode runs in


def model_dir(node_config: dict, message_config: dict) -> Path:
    """The node's own ``model-dir``, else the server's suggestion (per virtual node in simulation), else ``models``."""
    return Path(str(node_config.get("model-dir") or message_config.get("default-model-dir") or DEFAULT_MODEL_DIR))


def measure(folder: Path, manifest: dict, data: Dataset) -> tuple[dict[str, float], dict[str, str]]:
    """Per model: latency (ms per sample, batch 1 and 32, one thread), local top-1 accuracy, bytes of its file.

    Returns (metrics, runtimes): metrics keyed ``<model>-latency-ms-b1``, ``-latency-ms-b32``, ``-accuracy``,
    ``-bytes``; runtimes {model: runtime or why it was not run}.
    """
    metrics: dict[str, float] = {"num-examples": float(len(data))}
    runtimes: dict[str, str] = {}
    images, labels = data.images.numpy(), data.labels.numpy()
    for name, files in manifest["models"].items():
        try:
            model = runner(folder, name, files["files"])
        except NoRuntimeError as err:
            runtimes[name] = f"not run: {err}"
            continue
        runtimes[name] = model.runtime
        shape = tuple(manifest["input-shape"])
        metrics[f"{name}-latency-ms-b1"] = latency_ms(model, shape, 1)
        metrics[f"{name}-latency-ms-b32"] = latency_ms(model, shape, 32)
        predicted = [model.predict(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)]
        metrics[f"{name}-accuracy"] = float((np.concatenate(predicted) == labels).mean())
        metrics[f"{name}-bytes"] = float(model.path.stat().st_size)  # the file this runtime serves
    return metrics, runtimes


def deliver(msg: Message, node_config: dict, data_of, partition: int) -> Message:
    """Install and measure; ``data_of()`` loads this node's data (called only once the install succeeded).

    ``partition`` is the one this node trains on (its own ``partition-id`` wins over the server's hand-out;
    -1 with a ``data-dir``): the reply names it, so the server's device table shows the node's real data.

    Any failure is a reply with ``status`` 'failed' and the cause, never an exception: the server lists it.
    """
    message_config = dict(msg.content["config"])
    folder = model_dir(node_config, message_config)
    result = {"model-dir": str(folder), "device": device_name(), "status": "failed", "error": "",
              "partition": partition}
    metrics: dict[str, float] = {}
    try:
        manifest = json.loads(str(msg.content["manifest"]["json"]))
        files = {name: bytes(value) for name, value in msg.content["files"].items()}
        installed = install(folder, files, manifest)
        result.update({"status": "installed", "model-dir": str(installed.parent)})
        data, where = data_of()
        result["data"] = where
        metrics, runtimes = measure(installed, manifest, data)
        result["runtimes"] = json.dumps(runtimes)
    except ModelPackageError as err:
        result["error"] = str(err)
    except Exception as err:  # noqa: BLE001  (a measurement failure must not hide that the model is installed)
        result["error"] = f"{type(err).__name__}: {err}"
    return Message(RecordDict({"result": ConfigRecord(result), "metrics": MetricRecord(metrics)}), reply_to=msg)
