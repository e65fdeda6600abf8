"""Model families: each family aggregated among its own clients, its own model to each node, one teacher for all."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import model_family
from common.config import ConfigError, RunConfig
from common.model_families import FamilyError, pack, parse_families, parse_partitions, unpack
from common.models import build_model
from common.training import predict_logits
from server.aggregation import build_aggregator
from server.distillation import ServerDistillation, ensemble_logits
from server.families import ModelFamilies, family_roster, record_bytes
from server.strategy import DistillStrategy
from tests.fakes import FakeGrid, train_reply

pytestmark = pytest.mark.usefixtures("serverapp_identity")

# Two toy "families": their arrays differ in shape, as the large and small CNNs' do.
LARGE = {"w": np.zeros((4, 2), np.float32)}
SMALL = {"w": np.zeros((2, 2), np.float32)}


def record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def mixed_strategy(config, node_configs: dict, nodes=(1, 2, 3, 4), small_partitions=frozenset()):
    """A DistillStrategy over families large and small, after one configure_train on a FakeGrid."""
    families = ModelFamilies({"large": build_aggregator(config), "small": build_aggregator(config)}, small_partitions)
    strategy = DistillStrategy(families)
    grid = FakeGrid(list(nodes), node_configs=node_configs)
    messages = strategy.configure_train(1, pack({"large": record(LARGE), "small": record(SMALL)}), ConfigRecord({}), grid)
    return strategy, messages


def test_each_node_gets_its_own_familys_model_whether_declared_or_assigned_by_partition(config):
    # node 4 declares small; partition 2 is in small-partitions; the others train the first family
    strategy, messages = mixed_strategy(config, {1: {"partition-id": 0, "num-partitions": 4},
                                                 2: {"partition-id": 2, "num-partitions": 4},
                                                 3: {"partition-id": 1, "num-partitions": 4},
                                                 4: {"model": "small"}}, small_partitions=frozenset({2}))
    sent = {m.metadata.dst_node_id: (m.content["config"]["model-family"], m.content["arrays"]["w"].shape)
            for m in messages}
    assert sent == {1: ("large", (4, 2)), 3: ("large", (4, 2)), 2: ("small", (2, 2)), 4: ("small", (2, 2))}


def test_two_families_aggregate_separately_each_as_fedavg_over_its_own_replies(config):
    strategy, _ = mixed_strategy(config, {3: {"model": "small"}, 4: {"model": "small"}})
    replies = [train_reply({"w": np.full((4, 2), 1.0, np.float32)}, 1, {"num-examples": 10}),
               train_reply({"w": np.full((4, 2), 4.0, np.float32)}, 2, {"num-examples": 30}),
               train_reply({"w": np.full((2, 2), 2.0, np.float32)}, 3, {"num-examples": 5}),
               train_reply({"w": np.full((2, 2), 8.0, np.float32)}, 4, {"num-examples": 15})]
    arrays, _ = strategy.aggregate_train(1, replies)
    models = unpack(arrays, ("large", "small"))
    np.testing.assert_allclose(models["large"]["w"].numpy(), (10 * 1 + 30 * 4) / 40)
    np.testing.assert_allclose(models["small"]["w"].numpy(), (5 * 2 + 15 * 8) / 20)
    families = strategy.round_stats[1]["families"]
    assert families["large"]["valid"] == families["small"]["valid"] == 2
    assert families["small"]["bytes-sent"] == 2 * record_bytes(record(SMALL))  # each node its own family's model
    assert families["large"]["bytes-received"] == 2 * record_bytes(record(LARGE))


def test_a_reply_with_the_other_familys_shapes_is_rejected_and_named(config, caplog):
    strategy, _ = mixed_strategy(config, {3: {"model": "small"}, 4: {"model": "small"}})
    replies = [train_reply({"w": np.ones((4, 2), np.float32)}, 1, {"num-examples": 10}),
               train_reply({"w": np.ones((4, 2), np.float32)}, 3, {"num-examples": 10}),  # declared small
               train_reply({"w": np.ones((2, 2), np.float32)}, 4, {"num-examples": 10})]
    strategy.aggregate_train(1, replies)
    rejected = strategy.round_stats[1]["rejected"]
    assert rejected == [{"node-id": 3, "reason": "its arrays are the 'large' family's model, but this node trains "
                                                 "'small'"}]
    assert "dropped the update of node 3" in caplog.text


def test_a_family_with_no_valid_reply_keeps_its_model(config):
    strategy, _ = mixed_strategy(config, {3: {"model": "small"}, 4: {"model": "small"}})
    replies = [train_reply({"w": np.full((4, 2), 3.0, np.float32)}, 1, {"num-examples": 10}),
               train_reply({"w": np.full((2, 2), np.nan, np.float32)}, 3, {"num-examples": 10})]
    arrays, _ = strategy.aggregate_train(1, replies)
    models = unpack(arrays, ("large", "small"))
    np.testing.assert_allclose(models["large"]["w"].numpy(), 3.0)
    np.testing.assert_array_equal(models["small"]["w"].numpy(), SMALL["w"])
    assert strategy.round_stats[1]["families"]["small"]["aggregated"] is False


def test_a_node_declaring_a_family_the_run_does_not_federate_is_left_out(config, caplog):
    strategy = DistillStrategy(build_aggregator(config))  # one family: large
    grid = FakeGrid([1, 2], node_configs={2: {"model": "small"}})
    strategy.fraction_train = 0.99  # a sampling run asks the nodes
    messages = strategy.configure_train(1, record(LARGE), ConfigRecord({}), grid)
    assert [m.metadata.dst_node_id for m in messages] == [1]
    assert "node 2 declares model = 'small', which this run does not federate" in caplog.text


def test_the_fusion_teacher_over_mixed_families_is_the_mean_of_their_probabilities():
    torch.manual_seed(0)
    images = torch.randn(12, 1, 8, 8)
    members = [build_model("large", (1, 8, 8), 10), build_model("small", (1, 8, 8), 10),
               build_model("small", (1, 8, 8), 10)]
    t = 2.0
    logits = ensemble_logits(members, images, torch.device("cpu"), temperature=t, anchor_weight=0.0)
    expected = torch.stack([F.softmax(predict_logits(m, images, torch.device("cpu")) / t, 1) for m in members]).mean(0)
    assert torch.allclose(F.softmax(logits / t, 1), expected, atol=1e-6)


def test_cross_family_fusion_moves_every_family_and_reports_each(config):
    from common.data import server_sets

    config = dataclasses.replace(config, distill="ensemble", distill_target="global", distill_steps=20,
                                 model_families="large,small")
    proxy, _ = server_sets(config)
    torch.manual_seed(0)
    averaged = {f: ArrayRecord(build_model(f, proxy.input_shape, proxy.num_classes).state_dict())
                for f in ("large", "small")}
    clients = [(f, ArrayRecord(build_model(f, proxy.input_shape, proxy.num_classes).state_dict()))
               for f in ("large", "small", "small")]
    models, stats = ServerDistillation(config, proxy, torch.device("cpu")).run(averaged, clients)
    assert set(stats["families"]) == {"large", "small"} and stats["global"] is stats["families"]["large"]
    assert models["small"]["features.0.weight"].shape == (32, 1, 3, 3)  # each family keeps its architecture
    _, only_small = ServerDistillation(config, proxy, torch.device("cpu")).run(averaged, clients, fuse=["small"])
    assert set(only_small["families"]) == {"small"} and "global" not in only_small  # a family without replies


def test_pack_and_unpack_carry_every_family_and_one_family_unchanged():
    both = pack({"large": record(LARGE), "small": record(SMALL)})
    assert sorted(both) == ["large/w", "small/w"]
    assert unpack(both, ("large", "small"))["small"]["w"].shape == (2, 2)
    alone = record(LARGE)
    assert pack({"large": alone}) is alone and unpack(alone, ("large",))["large"] is alone
    with pytest.raises(FamilyError, match=r"no arrays of the family\(ies\) \['small'\]"):
        unpack(ArrayRecord({"large/w": Array(LARGE["w"])}), ("large", "small"))


def test_a_node_declaring_small_refuses_a_large_model():
    message = Message(RecordDict({"config": ConfigRecord({"model-family": "large"})}), dst_node_id=1,
                      message_type="train")
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={"model": "small"})
    with pytest.raises(ConfigError, match="declares model = 'small', but the server sent a 'large' model"):
        model_family(message, context)


@pytest.mark.parametrize("spec, parsed", [("", set()), ("3", {3}), ("0-2,7", {0, 1, 2, 7}), (" 1 , 4-5 ", {1, 4, 5})])
def test_small_partitions_are_numbers_and_ranges(spec, parsed):
    assert parse_partitions(spec) == parsed


@pytest.mark.parametrize("key, value, message", [
    ("model-families", "large,huge", "'model-families' = 'large,huge' is not allowed; use a comma-separated list"),
    ("model-families", "small,small", "'model-families' = 'small,small' is not allowed"),
    ("model-families", "", "'model-families' = '' is not allowed"),
    ("small-partitions", "3-1", "'small-partitions' = '3-1' is not allowed: '3-1' is neither a partition number >= 0 "
                                "nor a range a-b with a <= b"),
    ("small-partitions", "a", "'small-partitions' = 'a' is not allowed"),
    ("small-partitions", "0-4", "needs 'small' in 'model-families'"),
])
def test_bad_families_and_assignments_are_refused_naming_the_value(raw_config, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping({**raw_config, key: value})


@pytest.mark.parametrize("overrides, message", [
    ({"dp": "central", "dp-noise-multiplier": 1.0}, "'dp' = 'central' with model-families = 'large,small' is refused"),
    ({"small-partitions": "9", "num-partitions": 5}, "names partition 9, but num-partitions = 5"),
])
def test_combinations_mixed_families_cannot_run_are_refused_at_start(raw_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({**raw_config, "model-families": "large,small", **overrides})


def test_a_bad_model_in_a_node_config_is_refused():
    from common.config import check_node_config

    with pytest.raises(ConfigError, match="node config 'model' = 'huge' is not allowed; use one of 'large', 'small', 'tiny'"):
        check_node_config({"model": "huge"})
    assert parse_families("large,small") == ("large", "small")


def test_a_family_with_no_node_yet_is_skipped_not_waited_for(config):
    # Flower's FedAvg would wait with no deadline for one node of the empty family
    strategy, messages = mixed_strategy(config, {}, nodes=(1, 2))
    assert {m.content["config"]["model-family"] for m in messages} == {"large"} and len(messages) == 2
    replies = [train_reply({"w": np.full((4, 2), 2.0, np.float32)}, n, {"num-examples": 10}) for n in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(unpack(arrays, ("large", "small"))["small"]["w"].numpy(), SMALL["w"])


def test_nodes_left_out_stay_out_in_a_resumed_run(config):
    strategy = DistillStrategy(build_aggregator(config))
    strategy.fraction_train = 0.99
    strategy.configure_train(1, record(LARGE), ConfigRecord({}), FakeGrid([1, 2], node_configs={2: {"model": "small"}}))
    resumed = DistillStrategy(build_aggregator(config))
    resumed.load_partition_state(strategy.partition_state())
    assert resumed.left_out == {2}


def test_which_node_trains_which_family_is_said_and_a_family_no_node_trains_is_warned_of(config):
    strategy, _ = mixed_strategy(config, {1: {"model": "small"}}, nodes=(1, 2, 3))
    line, warnings = family_roster(strategy.aggregator, strategy.partition_of, [1, 2, 3], strategy.num_partitions)
    assert line == "large: 2 node(s), partitions 1-2; small: 1 node(s), partitions 0" and warnings == []
    strategy, _ = mixed_strategy(config, {}, nodes=(1, 2, 3))  # nobody small: its model would stay untrained
    _, warnings = family_roster(strategy.aggregator, strategy.partition_of, [1, 2, 3], strategy.num_partitions)
    assert len(warnings) == 1 and "model family 'small' has none of the 3 node(s)" in warnings[0]
    strategy, _ = mixed_strategy(config, {}, nodes=(1, 2), small_partitions=frozenset({0, 1}))  # nobody large
    _, warnings = family_roster(strategy.aggregator, strategy.partition_of, [1, 2], strategy.num_partitions)
    assert "'large' has none" in warnings[0] and "the global model (the teacher, which the student" in warnings[0]


def test_small_partitions_past_the_runs_partitions_are_refused_once_they_are_known(config):
    with pytest.raises(ConfigError, match="names partition 7, but this run has partitions 0 to 2"):
        mixed_strategy(config, {}, nodes=(1, 2, 3), small_partitions=frozenset({2, 7}))
