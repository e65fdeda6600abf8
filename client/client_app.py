"""The ClientApp: train the received model on this client's data, or evaluate it."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.delivery import deliver
from client.example_dp import charge_round, train_private
from client.local_dp import local_dp
from common.config import ConfigError, RunConfig, check_node_config
from common.data import Dataset, client_set
from common.image_folder import load_image_folder
from common.models import build_model
from common.training import evaluate, setup_compute, train_local

app = ClientApp(mods=[local_dp])  # dp = 'local': clip and noise the update before it leaves (client/local_dp.py)


def partition_of(node_config: dict, message_config: dict) -> tuple[int, int]:
    """(partition-id, num-partitions): from the node config when set there
    (simulation, hand-started SuperNodes), else the server's assignment."""
    source = node_config if "partition-id" in node_config else message_config
    return int(source["partition-id"]), int(source["num-partitions"])


def trained_partition(node_config: dict, message_config: dict) -> tuple[int, int]:
    """(partition-id, num-partitions) of this node's data, or (-1, 0) for its own ``data-dir``: what its replies name."""
    return (-1, 0) if node_config.get("data-dir") else partition_of(node_config, message_config)


def local_data(config: RunConfig, node_config: dict, message_config: dict) -> Dataset:
    """This node's data: its own folder (edge machine) or its partition of the pool."""
    if node_config.get("data-dir"):
        return load_image_folder(str(node_config["data-dir"]), config.dataset)
    return client_set(config, *partition_of(node_config, message_config))


def _setup(msg: Message, context: Context):
    """(run config, this node's data, compute device) for a train or evaluate message."""
    config = RunConfig.from_mapping(context.run_config)
    check_node_config(context.node_config)
    data = local_data(config, dict(context.node_config), dict(msg.content["config"]))
    if len(data) == 0:  # the partitioning guarantees one example; kept for edge cases it cannot see
        raise ConfigError(f"this client has no examples (dataset {config.dataset!r}, partitioning "
                          f"{config.partitioning!r}); lower num-partitions or give the node a data-dir")
    device = setup_compute(str(context.node_config.get("device", config.device)))
    return config, data, device


def model_family(msg: Message, context: Context) -> str:
    """The family of the model in ``msg``: its config's ``model-family`` (``large`` when absent).

    Raises:
        ConfigError: this node's config declares another ``model`` than the server sent.
    """
    family = str(msg.content["config"].get("model-family", "large"))
    declared = context.node_config.get("model")
    if declared and declared != family:
        raise ConfigError(f"this node's config declares model = {declared!r}, but the server sent a {family!r} "
                          "model; the server's run config must list the family in model-families")
    return family


def _model(data: Dataset, arrays: ArrayRecord, family: str = "large"):
    model = build_model(family, data.input_shape, data.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def shuffle_seed(config: RunConfig, msg: Message, context: Context) -> int:
    """Differs per round and client, and repeats with the run's seed (keyed by
    partition, not by node ID, which is new in every run)."""
    message_config = dict(msg.content["config"])
    client = context.node_id if context.node_config.get("data-dir") else partition_of(dict(context.node_config), message_config)[0]
    return config.seed + 1000 * int(message_config["server-round"]) + client % 1000


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local data, then local SGD from it.

    One message per round: the reply carries the new weights, the train metrics
    and the received model's local ``eval-loss`` / ``eval-accuracy`` (before
    training), so no separate evaluate message is needed (``fraction-evaluate=0``),
    and ``num-examples`` with the ``partition-id`` of ``num-partitions`` they are (-1: own data), which the
    server checks.
    With dp = 'example' the training is DP-SGD and the metrics carry its mechanism and ε.
    With aggregation = 'fedprox' the config record carries ``proximal-mu``, the
    weight of local training's proximal term (absent: 0, plain SGD).
    """
    config, data, device = _setup(msg, context)
    model = _model(data, msg.content["arrays"], model_family(msg, context))
    started = time.perf_counter()
    metrics = {f"eval-{k}": v for k, v in evaluate(model, data, device).items()}
    evaluated = time.perf_counter()
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))  # set by FedProx's configure_train
    seed = shuffle_seed(config, msg, context)
    if config.dp == "example":  # DP-SGD, per-example clipping and noise (client/example_dp.py)
        metrics["dp-rounds-trained"] = charge_round(context, config)
        metrics.update(train_private(model, data, config, device, seed, float(msg.content["config"]["dp-delta"])))
    else:
        metrics.update(train_local(model, data, config.local_epochs, config.batch_size, config.lr, device, seed,
                                   proximal_mu=proximal_mu))
    metrics.update({"num-examples": len(data), "eval-seconds": evaluated - started,
                    "train-seconds": time.perf_counter() - evaluated,
                    **dict(zip(("partition-id", "num-partitions"),
                               trained_partition(dict(context.node_config), dict(msg.content["config"]))))})
    content = RecordDict({"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def report_partition(msg: Message, context: Context) -> Message:
    """The partition this node's own config pins (``partition-id``), or -1 when the server's hand-out decides,
    and the model family it declares (``model``; '' when the run's assignment decides).

    The server asks once per node before it samples a fraction of them, so that
    it samples partitions rather than node IDs (new in every run): a seed then
    repeats which data trains in each round (``server/strategy.py``); and in a run
    with several model families, so that it sends each node its family's model.
    """
    node_config = dict(context.node_config)
    pinned = "partition-id" in node_config and not node_config.get("data-dir")
    partition = int(node_config["partition-id"]) if pinned else -1
    return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": partition}),
                                       "config": ConfigRecord({"model": str(node_config.get("model", ""))})}),
                   reply_to=msg)


@app.query("deliver")
def receive_models(msg: Message, context: Context) -> Message:
    """Install the delivered models in this node's ``model-dir`` and reply with their figures here.

    Message type ``query.deliver`` (``server/delivery.py``); the work is ``client/delivery.py``'s.
    """
    config = RunConfig.from_mapping(context.run_config)
    check_node_config(context.node_config)
    node_config, message_config = dict(context.node_config), dict(msg.content["config"])

    def data_of() -> tuple[Dataset, str]:
        if node_config.get("data-dir"):
            return local_data(config, node_config, message_config), f"data-dir {node_config['data-dir']}"
        partition, partitions = partition_of(node_config, message_config)
        return (client_set(config, partition, partitions),
                f"partition {partition} of {partitions} (the global model trained on it)")

    return deliver(msg, node_config, data_of, trained_partition(node_config, message_config)[0])


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Loss and accuracy on this client's data of every model in the message, and its ``num-examples``.

    Flower's global model (ArrayRecord ``arrays``) gives ``local-loss`` and
    ``local-accuracy``; any other ArrayRecord, e.g. the fusion check's ``averaged``
    and ``fused`` (``server/fusion_check.py``), gives ``<name>-loss`` and
    ``<name>-accuracy``. Only these numbers leave the node.
    """
    names = list(msg.content.array_records)
    if not names:
        raise ValueError("this evaluate message carries no model (no ArrayRecord) to evaluate")
    _, data, device = _setup(msg, context)
    family = model_family(msg, context)
    metrics: dict = {"num-examples": len(data)}
    for name in names:
        prefix = "local" if name == "arrays" else name
        scores = evaluate(_model(data, msg.content[name], family), data, device)
        metrics.update({f"{prefix}-{k}": v for k, v in scores.items()})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
