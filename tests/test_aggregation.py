"""`aggregation` picks a Flower strategy; sampling, validation, clipping and distillation wrap every choice."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from tests.fakes import FakeGrid, train_reply

GLOBAL = {"w": np.zeros((2, 2), np.float32)}


pytestmark = pytest.mark.usefixtures("serverapp_identity")


def reply(value: float, node_id: int, num_examples: int = 10) -> Message:
    return train_reply({"w": np.full((2, 2), value, np.float32)}, node_id, {"num-examples": num_examples, "train-loss": 0.5})


class RecordingDistillation:
    """Stands in for ServerDistillation: records what it is given, returns the aggregate unchanged."""

    def __init__(self):
        self.calls = []

    def run(self, global_arrays, client_arrays):
        self.calls.append((global_arrays["w"].numpy().copy(), [a["w"].numpy().copy() for a in client_arrays]))
        return global_arrays, {"seconds": 0.0}


def start_round(strategy, nodes):
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), FakeGrid(nodes))


# Five clients, one of them sends an update 1e30 times too large.
HONEST = [1.0, 2.0, 3.0, 4.0]
SURVIVES_A_HUGE_UPDATE = {  # aggregation, extra settings -> the aggregate's value
    ("fedavg", ()): None,  # ruined
    ("fedavg", (("max_update_norm", 4.0),)): "bounded",
    ("trimmed-mean", ()): 3.0,  # beta 0.2 of 5 cuts one from each end: mean(2, 3, 4)
    ("median", ()): 3.0,
}


@pytest.mark.parametrize("aggregation, extra", SURVIVES_A_HUGE_UPDATE)
def test_which_aggregation_survives_an_update_scaled_by_1e30(make_strategy, aggregation, extra):
    strategy = make_strategy(aggregation, **dict(extra))
    start_round(strategy, [1, 2, 3, 4, 5])
    arrays, _ = strategy.aggregate_train(1, [reply(v, i + 1) for i, v in enumerate(HONEST)] + [reply(1e30, 5)])
    value = arrays["w"].numpy()
    expected = SURVIVES_A_HUGE_UPDATE[(aggregation, extra)]
    if expected is None:
        assert value.max() > 1e28
    elif expected == "bounded":
        assert np.linalg.norm(value) <= 4.0 + 1e-5  # the mean of updates each clipped to norm 4
    else:
        np.testing.assert_allclose(value, expected)


@pytest.mark.parametrize("aggregation", ["fedavg", "trimmed-mean", "median"])
def test_distillation_sees_the_aggregate_and_every_valid_client_model_whatever_the_aggregation(make_strategy, aggregation):
    distillation = RecordingDistillation()
    strategy = make_strategy(aggregation, distillation=distillation)
    start_round(strategy, [1, 2, 3])
    strategy.aggregate_train(1, [reply(1.0, 1), reply(np.nan, 2), reply(4.0, 3)])
    (aggregate, clients), = distillation.calls
    assert sorted(c[0, 0] for c in clients) == [1.0, 4.0]  # FedMedian/FedTrimmedAvg empty the replies they read
    assert aggregate[0, 0] == pytest.approx(2.5)


def test_replies_are_aggregated_in_an_order_set_by_their_content_not_by_arrival_or_node_id(make_strategy):
    """Float sums depend on order: the same seed must give the same model however replies arrive."""
    values = [0.1, 1e8, -1e8, 0.3]
    results = []
    for arrival, node_ids in (([1, 2, 3, 4], [1, 2, 3, 4]), ([4, 3, 2, 1], [1, 2, 3, 4]), ([2, 4, 1, 3], [40, 7, 9, 3])):
        strategy = make_strategy()
        start_round(strategy, node_ids)
        arrays, _ = strategy.aggregate_train(1, [reply(values[n - 1], node_ids[n - 1]) for n in arrival])
        results.append(arrays["w"].numpy())
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_trimmed_mean_that_trims_nothing_says_so(make_strategy, caplog):
    strategy = make_strategy("trimmed-mean", trimmed_mean_beta=0.2)
    start_round(strategy, [1, 2, 3])
    strategy.aggregate_train(1, [reply(1.0, 1), reply(2.0, 2), reply(3.0, 3)])
    assert "trimmed-mean-beta = 0.2 trims nothing from 3 updates" in caplog.text
