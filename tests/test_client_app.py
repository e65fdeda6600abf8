"""The ClientApp's train reply: one message per round carries the received model's local evaluation."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import train
from common.config import ConfigError, RunConfig
from common.data import client_set
from common.models import build_teacher
from common.training import evaluate, setup_compute


@pytest.fixture(autouse=True)
def clientapp_identity():
    """Messages can only be built inside a run, as in a ClientApp process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def test_train_reply_carries_the_local_evaluation_of_the_model_it_received(raw_config):
    raw_config.update({"local-epochs": 1})
    config = RunConfig.from_mapping(raw_config)
    data = client_set(config, 1, 3)
    torch.manual_seed(0)
    received = build_teacher(data.input_shape, data.num_classes)
    before = evaluate(received, data, setup_compute("cpu"))

    request = Message(
        content=RecordDict({"arrays": ArrayRecord(received.state_dict()),
                            "config": ConfigRecord({"server-round": 1, "partition-id": 1, "num-partitions": 3})}),
        dst_node_id=7, message_type="train",
    )
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=raw_config)
    metrics = train(request, context).content["metrics"]

    assert metrics["num-examples"] == len(data)
    assert metrics["eval-accuracy"] == pytest.approx(before["accuracy"])
    assert metrics["eval-loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert metrics["eval-seconds"] > 0 and metrics["train-seconds"] > 0
    assert metrics["train-accuracy"] > metrics["eval-accuracy"]  # it trained after evaluating


def test_one_message_per_round_is_the_default(config):
    assert config.fraction_evaluate == 0.0


def test_a_node_config_key_the_app_does_not_read_is_refused_naming_it(raw_config):
    request = Message(
        content=RecordDict({"arrays": ArrayRecord(build_teacher((1, 8, 8), 10).state_dict()),
                            "config": ConfigRecord({"server-round": 1, "partition-id": 0, "num-partitions": 3})}),
        dst_node_id=7, message_type="train",
    )
    context = Context(run_id=1, node_id=7, node_config={"partition_id": 1}, state=RecordDict(), run_config=raw_config)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'partition_id'; known keys: partition-id, "):
        train(request, context)
