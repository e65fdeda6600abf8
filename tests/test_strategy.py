"""The server strategy: FedAvg's n_i/n weighting, partitions handed to nodes, distillation wired in."""

import logging
import random
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from server.sampling import NoNodesError
from tests.fakes import FakeGrid, train_reply


pytestmark = pytest.mark.usefixtures("serverapp_identity")


def reply(weights: dict[str, np.ndarray], num_examples: int, node_id: int) -> Message:
    return train_reply(weights, node_id, {"num-examples": num_examples, "train-loss": float(num_examples)})


def test_aggregate_is_the_example_weighted_mean_of_client_models(make_strategy):
    rng = np.random.default_rng(0)
    updates = [({"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}, n)
               for n in (10, 30, 60)]
    strategy = make_strategy()
    strategy.global_arrays = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in updates[0][0].items()})
    arrays, metrics = strategy.aggregate_train(1, [reply(w, n, i + 1) for i, (w, n) in enumerate(updates)])
    total = sum(n for _, n in updates)
    for key in ("w", "b"):
        expected = sum((n / total) * w[key] for w, n in updates)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(sum(n * n for _, n in updates) / total)
    stats = strategy.round_stats[1]
    assert [c["num-examples"] for c in stats["clients"]] == [10, 30, 60] and stats["failures"] == 0


def test_server_hands_each_node_its_own_partition(make_strategy):
    strategy = make_strategy(min_nodes=1, fraction_evaluate=1.0)
    grid = FakeGrid([907, 12, 455])
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = strategy.configure_train(1, arrays, ConfigRecord({}), grid)
    assigned = {m.metadata.dst_node_id: m.content["config"]["partition-id"] for m in messages}
    assert assigned == {12: 0, 455: 1, 907: 2}
    assert {m.content["config"]["num-partitions"] for m in messages} == {3}
    again = strategy.configure_evaluate(2, arrays, ConfigRecord({}), grid)
    assert {m.metadata.dst_node_id: m.content["config"]["partition-id"] for m in again} == assigned


ZEROS = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})


def test_a_seed_samples_the_same_data_whatever_ids_the_nodes_get(make_strategy):
    # Simulation gives nodes new random IDs in every run; each node's own config pins the data it trains on.
    trained = []
    for run in range(4):
        ids = random.Random(run).sample(range(1, 10**6), 10)
        grid = FakeGrid(ids, node_configs={node: {"partition-id": p, "num-partitions": 10} for p, node in enumerate(ids)})
        strategy = make_strategy(fraction_train=0.4, sampling_seed=7)  # the ServerApp passes the run's seed
        rounds = []
        for server_round in (1, 2, 3):
            random.random()  # Ray, in the same process, draws from the random module at times of its own
            rounds.append(sorted(grid.node_configs[m.metadata.dst_node_id]["partition-id"]
                                 for m in strategy.configure_train(server_round, ZEROS, ConfigRecord({}), grid)))
            random.seed(run)
        trained.append(rounds)
    assert all(rounds == trained[0] for rounds in trained), trained
    assert all(len(partitions) == 4 for partitions in trained[0]) and len({tuple(p) for p in trained[0]}) > 1


def test_a_pinned_partition_is_what_the_server_records_and_sends_and_the_others_get_free_ones(make_strategy):
    strategy = make_strategy(fraction_train=0.5)
    grid = FakeGrid([30, 10, 20, 40], node_configs={40: {"partition-id": 0}, 20: {"data-dir": "/x", "partition-id": 3}})
    messages = strategy.configure_train(1, ZEROS, ConfigRecord({}), grid)
    assert [m.metadata.message_type for m in grid.sent] == ["query"] * 4  # asked once, before sampling
    # 40 pins 0; 10, 20 (own data: its pin is not a partition) and 30 (pins nothing) get the free ones in ID order.
    assert strategy.partition_of == {40: 0, 10: 1, 20: 2, 30: 3}
    assert all(m.content["config"]["partition-id"] == strategy.partition_of[m.metadata.dst_node_id] for m in messages)
    strategy.configure_train(2, ZEROS, ConfigRecord({}), grid)
    assert len(grid.sent) == 4  # known nodes are not asked again


def test_a_node_that_does_not_say_its_partition_gets_one_and_a_warning_names_it(make_strategy, caplog):
    strategy = make_strategy(fraction_train=0.5)
    grid = FakeGrid([1, 2, 3], node_configs={1: {"partition-id": 2}, 3: {"partition-id": 0}}, silent=[3])
    strategy.configure_train(1, ZEROS, ConfigRecord({}), grid)
    assert strategy.partition_of == {1: 2, 2: 0, 3: 1}
    assert "node(s) [3] did not say their partition" in caplog.text


@pytest.mark.parametrize("fraction_train, fraction_evaluate, asked", [(1.0, 0.0, False), (1.0, 1.0, False),
                                                                      (1.0, 0.5, True), (0.5, 0.0, True)])
def test_nodes_are_asked_their_partition_only_when_a_phase_samples_a_fraction(make_strategy, fraction_train,
                                                                              fraction_evaluate, asked):
    grid = FakeGrid([3, 1, 2], node_configs={1: {"partition-id": 2}})
    make_strategy(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate).configure_train(
        1, ZEROS, ConfigRecord({}), grid)
    assert bool(grid.sent) == asked


def test_a_resumed_run_hands_the_partitions_of_nodes_gone_to_new_ones(make_strategy):
    strategy = make_strategy()
    strategy.load_partition_state({"partition-of": {"11": 0, "12": 1, "13": 2}, "num-partitions": 3})
    strategy.configure_train(1, ZEROS, ConfigRecord({}), FakeGrid([12, 50, 60]))  # 11 and 13 came back as 50, 60
    assert [strategy.partition_of[n] for n in (12, 50, 60)] == [1, 0, 2]


def test_sampling_waits_for_min_nodes_at_most_node_wait_timeout_then_goes_on_with_those_there(make_strategy):
    strategy = make_strategy(min_nodes=3, node_wait_timeout=0.3)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    started = time.monotonic()
    messages = strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid([5, 6]))
    assert 0.3 <= time.monotonic() - started < 2  # Flower's sample_nodes would wait forever
    assert sorted(m.metadata.dst_node_id for m in messages) == [5, 6]


def test_sampling_with_no_node_at_all_stops_the_run_with_what_to_change(make_strategy):
    strategy = make_strategy(min_nodes=2, node_wait_timeout=0.2)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    with pytest.raises(NoNodesError, match=r"no SuperNode connected within node-wait-timeout = 0.2 s \(min-nodes = 2\)"):
        strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid([]))


class ShrinkingGrid(FakeGrid):
    """A node leaves right after the first look (FedAvg looked twice and then waited forever)."""

    def get_node_ids(self):
        nodes, self.node_ids = self.node_ids, self.node_ids[:-1]
        return nodes


def test_a_node_leaving_during_sampling_cannot_hang_the_round(make_strategy):
    strategy = make_strategy(min_nodes=3, node_wait_timeout=5)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = strategy.configure_train(1, arrays, ConfigRecord({}), ShrinkingGrid([1, 2, 3]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]


def test_instructions_expire_with_the_round_timeout(make_strategy):
    strategy = make_strategy(min_nodes=1, round_timeout=42.0, fraction_evaluate=0.5)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    train = strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), FakeGrid([1, 2, 3, 4]))
    evaluate = strategy.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid([1, 2, 3, 4]))
    assert {m.metadata.ttl for m in [*train, *evaluate]} == {42.0}
    assert len(train) == 4 and len(evaluate) == 2
    assert all(m.content["config"]["server-round"] == 1 and m.content["config"]["lr"] == 0.1 for m in train)


class RegisteredState:
    """The in-memory LinkState as the simulation leaves it: ``nodes`` in registration order."""

    def __init__(self, node_ids):
        self.nodes = {node: object() for node in node_ids}


def simulated_grid(node_ids, partition_of):
    """A FakeGrid whose nodes pin their partition as Flower's simulation sets it: partition-id of num-partitions."""
    return FakeGrid(node_ids, node_configs={n: {"partition-id": partition_of(i), "num-partitions": len(node_ids)}
                                            for i, n in enumerate(node_ids)})


def test_a_simulations_partitions_come_from_its_registration_order_after_asking_a_few(make_strategy, caplog):
    from server.sampling import SimulationRoster

    registered = [907, 13, 512, 4, 77, 300, 41, 8, 66, 250, 19, 5]  # node IDs are random; order is partition order
    grid = simulated_grid(registered, lambda i: i)
    strategy = make_strategy(fraction_train=0.5, roster=SimulationRoster(RegisteredState(registered), seed=1, confirm=4))
    strategy.configure_train(1, ZEROS, ConfigRecord({}), grid)
    assert strategy.partition_of == {node: i for i, node in enumerate(registered)}
    assert [m.metadata.message_type for m in grid.sent].count("query") == 4  # not 12
    assert "partitions of 12 virtual nodes follow the simulation's registration order (4 asked agree)" in caplog.text


def test_when_the_registration_order_disagrees_with_an_answer_every_node_is_asked(make_strategy, caplog):
    from server.sampling import SimulationRoster

    registered = list(range(100, 112))
    grid = simulated_grid(registered, lambda i: (i + 1) % 12)  # the nodes' own partitions are not the order
    strategy = make_strategy(fraction_train=0.5, roster=SimulationRoster(RegisteredState(registered), seed=1, confirm=4))
    strategy.configure_train(1, ZEROS, ConfigRecord({}), grid)
    assert strategy.partition_of == {node: (i + 1) % 12 for i, node in enumerate(registered)}
    assert [m.metadata.message_type for m in grid.sent].count("query") == 4 + 12
    assert "registration order does not give its nodes' partitions" in caplog.text


def test_with_an_example_dp_budget_a_partition_trains_at_most_its_rounds_and_a_round_shrinks_when_few_are_left(
        make_strategy, caplog):
    """dp-example-rounds = 1: 6 nodes, half a round. Rounds 1 and 2 train 3 partitions each, all different; round 3
    finds none left and trains none; the count goes with the partition into a resumed run."""
    from server.sampling import TrainingBudget

    grid = FakeGrid([11, 22, 33, 44, 55, 66])
    strategy = make_strategy(fraction_train=0.5, sampling_seed=0, budget=TrainingBudget(1))
    rounds = [{m.content["config"]["partition-id"] for m in strategy.configure_train(r, ZEROS, ConfigRecord({}), grid)}
              for r in (1, 2)]
    assert len(rounds[0]) == len(rounds[1]) == 3 and not rounds[0] & rounds[1]
    with caplog.at_level(logging.WARNING):
        assert strategy.configure_train(3, ZEROS, ConfigRecord({}), grid) == []
    assert "round 3 trains 0 nodes, not 3: only 0 partitions have a round left of dp-example-rounds = 1" in caplog.text
    resumed = make_strategy(fraction_train=0.5, budget=TrainingBudget(2))
    resumed.load_partition_state(strategy.partition_state())
    assert resumed.budget.trained == {p: 1 for p in range(6)}
    assert len(resumed.configure_train(4, ZEROS, ConfigRecord({}), grid)) == 3  # each has a round left of 2
    unbudgeted = make_strategy(fraction_train=0.5, sampling_seed=0)
    assert all(len(unbudgeted.configure_train(r, ZEROS, ConfigRecord({}), grid)) == 3 for r in (1, 2, 3))


def test_with_an_example_dp_budget_two_nodes_on_one_partition_never_train_in_the_same_round(make_strategy):
    """4 nodes on 2 partitions (they wrap around), every node asked, 2 rounds each: one node per partition a round."""
    from server.sampling import TrainingBudget

    grid = FakeGrid([11, 22, 33, 44])
    strategy = make_strategy(fraction_train=1.0, num_partitions=2, budget=TrainingBudget(2))
    rounds = [sorted(m.content["config"]["partition-id"] for m in strategy.configure_train(r, ZEROS, ConfigRecord({}),
                                                                                           grid)) for r in (1, 2, 3)]
    assert rounds == [[0, 1], [0, 1], []] and strategy.budget.trained == {0: 2, 1: 2}
