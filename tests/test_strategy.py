"""DistillFedAvg: FedAvg's n_i/n weighting, partitions handed to nodes, distillation wired in."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from server.strategy import DistillFedAvg


@pytest.fixture(autouse=True)
def serverapp_identity():
    """Messages can only be built inside a run, as in a ServerApp process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def reply(weights: dict[str, np.ndarray], num_examples: int, node_id: int) -> Message:
    """A client's train reply, as it arrives at the server."""
    request = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": float(num_examples)}),
    })
    return Message(content=content, reply_to=request)


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def test_aggregate_is_the_example_weighted_mean_of_client_models():
    rng = np.random.default_rng(0)
    updates = [({"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}, n)
               for n in (10, 30, 60)]
    strategy = DistillFedAvg(distillation=None)
    strategy.global_arrays = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in updates[0][0].items()})
    arrays, metrics = strategy.aggregate_train(1, [reply(w, n, i + 1) for i, (w, n) in enumerate(updates)])
    total = sum(n for _, n in updates)
    for key in ("w", "b"):
        expected = sum((n / total) * w[key] for w, n in updates)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(sum(n * n for _, n in updates) / total)
    stats = strategy.round_stats[1]
    assert [c["num-examples"] for c in stats["clients"]] == [10, 30, 60] and stats["failures"] == 0


def test_server_hands_each_node_its_own_partition():
    strategy = DistillFedAvg(distillation=None, min_available_nodes=1)
    grid = FakeGrid([907, 12, 455])
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = strategy.configure_train(1, arrays, ConfigRecord({}), grid)
    assigned = {m.metadata.dst_node_id: m.content["config"]["partition-id"] for m in messages}
    assert assigned == {12: 0, 455: 1, 907: 2}
    assert {m.content["config"]["num-partitions"] for m in messages} == {3}
    again = strategy.configure_evaluate(2, arrays, ConfigRecord({}), grid)
    assert {m.metadata.dst_node_id: m.content["config"]["partition-id"] for m in again} == assigned
