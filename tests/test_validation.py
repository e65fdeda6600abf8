"""Every client update is checked against the global model before aggregation; one bad reply never
poisons the model or stops the run (issue 8's table of faults, each row a case)."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from server.validation import screen_replies
from tests.fakes import train_reply

GLOBAL = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
GOOD = [({"w": np.full((3, 2), 1.0, np.float32), "b": np.full(2, 1.0, np.float32)}, 10, 1),
        ({"w": np.full((3, 2), 3.0, np.float32), "b": np.full(2, 3.0, np.float32)}, 30, 2)]


pytestmark = pytest.mark.usefixtures("serverapp_identity")


def reply(weights: dict, num_examples, node_id: int, metrics: dict | None = None) -> Message:
    return train_reply(weights, node_id, metrics if metrics is not None else {"num-examples": num_examples, "train-loss": 0.5})


def aggregate(bad: Message, make_strategy):
    strategy = make_strategy()
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    arrays, _ = strategy.aggregate_train(1, [reply(*g) for g in GOOD] + [bad])
    return arrays, strategy.round_stats[1]


def good_weights(**changes) -> dict:
    weights = {k: v.copy() for k, v in GOOD[0][0].items()}
    weights.update(changes)
    return {k: v for k, v in weights.items() if v is not None}


CASES = {  # case: (the bad reply, built inside a run; the reason it is dropped for)
    "nan": (lambda: reply(good_weights(w=np.full((3, 2), np.nan, np.float32)), 10, 9), "non-finite"),
    "inf": (lambda: reply(good_weights(b=np.array([1.0, np.inf], np.float32)), 10, 9), "non-finite"),
    "shape that cannot broadcast": (lambda: reply(good_weights(w=np.ones((4, 5), np.float32)), 10, 9), "'w' is float32[4, 5]"),
    "shape that would broadcast": (lambda: reply(good_weights(b=np.ones(1, np.float32)), 10, 9), "'b' is float32[1]"),
    "dtype": (lambda: reply(good_weights(w=np.ones((3, 2), np.float64)), 10, 9), "'w' is float64[3, 2]"),
    "missing tensor": (lambda: reply(good_weights(b=None), 10, 9), "missing ['b']"),
    "extra tensor": (lambda: reply(good_weights(extra=np.ones(1, np.float32)), 10, 9), "unexpected ['extra']"),
    "negative num-examples": (lambda: reply(good_weights(), -50, 9), "'num-examples' = -50 is not allowed"),
    "fractional num-examples": (lambda: reply(good_weights(), 2.5, 9), "'num-examples' = 2.5 is not allowed"),
    "no num-examples": (lambda: reply(good_weights(), 0, 9, metrics={"train-loss": 0.5}), "'num-examples' = None"),
    "other metric names": (lambda: reply(good_weights(), 10, 9, metrics={"num-examples": 10, "loss": 0.5}), "metric names"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_update_is_dropped_named_and_counted_and_the_rest_are_averaged(case, make_strategy):
    make_bad, reason = CASES[case]
    arrays, stats = aggregate(make_bad(), make_strategy)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), 2.5))  # (10·1 + 30·3) / 40
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(2, 2.5))
    assert [r["node-id"] for r in stats["rejected"]] == [9] and reason in stats["rejected"][0]["reason"]
    assert stats["heard-from"] == [1, 2, 9] and stats["failures"] == 0 and len(stats["clients"]) == 2


def test_a_round_without_a_valid_update_keeps_the_model_and_skips_distillation(make_strategy):
    class NoDistillation:
        def run(self, *_):
            raise AssertionError("distillation must not run without an aggregate")

    strategy = make_strategy(distillation=NoDistillation())
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    arrays, metrics = strategy.aggregate_train(1, [reply(w, 0, node) for w, _, node in GOOD])
    assert arrays is None and metrics is None  # Flower's Strategy.start keeps the previous arrays
    assert len(strategy.round_stats[1]["rejected"]) == 2 and "distill" not in strategy.round_stats[1]


def test_error_replies_pass_through_as_failures_not_rejections():
    from flwr.app import Error

    request = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=5, message_type="train")
    failed = Message(Error(code=5, reason="Node Unavailable"), reply_to=request)
    valid, errors, rejected = screen_replies([failed, reply(*GOOD[0])], ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    assert len(valid) == 1 and errors == [failed] and rejected == []


def test_clipping_bounds_every_update_and_survives_a_huge_one(make_strategy):
    huge = ({"w": np.full((3, 2), 1e30, np.float32), "b": np.full(2, 1e30, np.float32)}, 10, 9)
    plain = make_strategy()
    clipped = make_strategy(max_update_norm=1.0)
    results = {}
    for name, strategy in (("plain", plain), ("clipped", clipped)):
        strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        results[name], _ = strategy.aggregate_train(1, [reply(*g) for g in GOOD] + [reply(*huge)])
    assert np.abs(results["plain"]["w"].numpy()).max() > 1e28  # FedAvg alone: the model is ruined
    aggregate = np.concatenate([results["clipped"][k].numpy().ravel() for k in ("w", "b")])
    assert np.linalg.norm(aggregate) <= 1.0 + 1e-6  # a mean of updates each of norm <= 1, from a zero model
    stats = clipped.round_stats[1]
    norms = {c["node-id"]: c["norm"] for c in stats["clipped"]}
    assert sorted(norms) == [1, 2, 9] and norms[9] > 1e30


def test_updates_within_the_norm_are_left_exactly_as_sent(make_strategy):
    strategy = make_strategy(max_update_norm=100.0)
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    arrays, _ = strategy.aggregate_train(1, [reply(*g) for g in GOOD])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((3, 2), 2.5, np.float32))
    assert strategy.round_stats[1]["clipped"] == []


# Clients that lie about their data (issue 23): FedAvg weights by the claimed num-examples.
SIZES = {3: [10, 30, 20], 1: [60]}  # the pool cut in k partitions, as common.data.partition_sizes would


def sizes_of(k: int) -> list[int]:
    if k not in SIZES:
        raise ValueError(f"num-partitions = {k} is not allowed")
    return SIZES[k]


def counted(partition: int, num_examples, node_id: int, weights: dict | None = None, partitions: int = 3) -> Message:
    return reply(weights or good_weights(), num_examples, node_id, {
        "num-examples": num_examples, "train-loss": 0.5, "partition-id": partition, "num-partitions": partitions})


def honest() -> list[Message]:
    return [counted(partition, n, node, w) for partition, (w, n, node) in enumerate(GOOD)]


def aggregate_counted(replies: list[Message], make_strategy, max_ratio: float = 4.0):
    from server.validation import ExampleCounts

    strategy = make_strategy(example_counts=ExampleCounts(sizes_of, max_ratio), num_partitions=3)
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays, metrics, strategy.round_stats[1]


LIARS = {  # case: (the lying reply, the reason it is rejected for)
    "another count than its partition's": (lambda: counted(2, 10**12, 9), "'num-examples' = 1000000000000, but partition "
                                                                  "2 of 3 holds 20 examples"),
    "a partition the pool does not have": (lambda: counted(3, 20, 9), "partition-id = 3, but the pool has 3 partitions"),
    "a partitioning the pool cannot have": (lambda: counted(0, 20, 9, partitions=0), "num-partitions = 0, which the "
                                                                                     "pool cannot be cut into"),
}


@pytest.mark.parametrize("case", LIARS)
def test_a_client_on_a_partition_must_claim_that_partitions_size(case, make_strategy):
    make_liar, reason = LIARS[case]
    arrays, metrics, stats = aggregate_counted(honest() + [make_liar()], make_strategy)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), 2.5))  # the honest two alone
    assert [r["node-id"] for r in stats["rejected"]] == [9] and reason in stats["rejected"][0]["reason"]
    assert "partition-id" not in metrics and stats["capped-examples"] == []  # taken out before FedAvg averages


def test_a_client_on_its_own_data_weighs_at_most_max_examples_ratio_times_the_median_claim(make_strategy):
    liar = counted(-1, 10**12, 9, {"w": np.full((3, 2), 5.0, np.float32), "b": np.full(2, 5.0, np.float32)})
    arrays, _, stats = aggregate_counted(honest() + [liar], make_strategy)
    # Lower median of (10, 30, 10^12) = 30; cap 4 x 30 = 120: (10·1 + 30·3 + 120·5) / 160.
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), 700 / 160))
    assert stats["capped-examples"] == [{"node-id": 9, "claimed": 10**12, "counted": 120}] and not stats["rejected"]
    assert {c["node-id"]: c["num-examples"] for c in stats["clients"]}[9] == 120


def test_without_the_cap_an_own_data_claim_decides_the_model(make_strategy):
    liar = counted(-1, 10**12, 9, {"w": np.full((3, 2), 5.0, np.float32), "b": np.full(2, 5.0, np.float32)})
    arrays, _, stats = aggregate_counted(honest() + [liar], make_strategy, max_ratio=0)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), 5.0), rtol=1e-6)
    assert stats["capped-examples"] == []


def test_a_node_on_another_partitioning_is_checked_on_it_then_capped_like_own_data(make_strategy):
    # Pinned num-partitions = 1 (the whole pool, 60): a true count, but not this run's partitioning.
    whole = counted(0, 60, 9, {"w": np.full((3, 2), 5.0, np.float32), "b": np.full(2, 5.0, np.float32)}, partitions=1)
    arrays, _, stats = aggregate_counted(honest() + [whole], make_strategy, max_ratio=1)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), 250 / 70))  # (10·1 + 30·3 + 30·5) / 70
    assert stats["capped-examples"] == [{"node-id": 9, "claimed": 60, "counted": 30}] and not stats["rejected"]


def test_honest_claims_on_own_data_within_the_cap_keep_their_weight(make_strategy):
    replies = [counted(-1, n, node, w) for w, n, node in GOOD]
    arrays, _, stats = aggregate_counted(replies, make_strategy)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), 2.5))
    assert stats["capped-examples"] == [] and stats["rejected"] == []


def test_the_server_computes_each_partitions_size_as_the_clients_split_the_pool(config):
    from common.data import client_set, partition_sizes

    sizes = partition_sizes(config, 4)
    assert sizes == [len(client_set(config, p, 4)) for p in range(4)] and sum(sizes) > 0
