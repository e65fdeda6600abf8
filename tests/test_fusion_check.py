"""The fusion check: the clients score the averaged and the fused model on their own data; the better one goes on."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.client_app import evaluate_local
from common.config import ConfigError, RunConfig
from common.data import client_set
from common.models import build_teacher
from common.training import evaluate, setup_compute
from server.fusion_check import FusionCheck, choose
from tests.fakes import train_reply

pytestmark = pytest.mark.usefixtures("serverapp_identity")

AVERAGED = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
FUSED = ArrayRecord({"w": Array(np.ones(4, np.float32))})


def request(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate")


def scores(node: int, n: int, averaged: float, fused: float, **extra) -> Message:
    """A node's evaluate reply: its example count and each candidate's accuracy (loss 1 - accuracy)."""
    metrics = {"num-examples": n, "averaged-accuracy": averaged, "averaged-loss": 1 - averaged,
               "fused-accuracy": fused, "fused-loss": 1 - fused, **extra}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request(node))


class ScriptedGrid:
    """Connected nodes whose evaluate replies are scripted: {node: (n, averaged acc, fused acc)}, each reply
    scoring the candidates its message carries; other nodes stay silent. Messages sent are kept in ``sent``."""

    def __init__(self, answers: dict[int, tuple[int, float, float]], connected: list[int] | None = None):
        self.answers, self.connected, self.sent = answers, connected or sorted(answers), []
        self.pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.connected)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.sent.append(message)
            ids.append(f"m{len(self.sent)}")
            self.pending[ids[-1]] = message
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in list(message_ids):
            message = self.pending.pop(mid, None)
            if message is None or message.metadata.dst_node_id not in self.answers:
                continue
            n, averaged, fused = self.answers[message.metadata.dst_node_id]
            reply = scores(message.metadata.dst_node_id, n, averaged, fused)
            for name in {"averaged", "fused"} - set(message.content.array_records):
                del reply.content["metrics"][f"{name}-accuracy"], reply.content["metrics"][f"{name}-loss"]
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def test_the_candidate_with_the_higher_example_weighted_client_accuracy_is_kept():
    # Unweighted, fused wins (mean 0.75 vs 0.70); weighted by examples, averaged does (0.864 vs 0.818).
    verdict = choose([scores(1, 100, averaged=0.9, fused=0.8), scores(2, 10, averaged=0.5, fused=1.0)], "fused")
    assert verdict["kept"] == "averaged" and verdict["by"] == "clients"
    assert verdict["accuracy"] == pytest.approx({"averaged": 95 / 110, "fused": 90 / 110})
    assert verdict["answered"] == 2 and verdict["examples"] == 110
    assert choose([scores(1, 100, averaged=0.8, fused=0.9)], "averaged")["kept"] == "fused"


def test_a_tie_keeps_the_averaged_model():
    assert choose([scores(1, 30, 0.6, 0.7), scores(2, 30, 0.7, 0.6)], "fused")["kept"] == "averaged"


@pytest.mark.parametrize("bad", [
    {"num-examples": 0}, {"num-examples": 2.5}, {"fused-accuracy": 1.5}, {"fused-loss": float("nan")},
    {"fused-accuracy": -0.1}])
def test_a_rejected_reply_does_not_count_and_its_reason_is_recorded(bad):
    liar = scores(2, 1000, averaged=0.0, fused=1.0, **bad)  # it alone would make fusion win
    verdict = choose([scores(1, 50, averaged=0.9, fused=0.5), liar], "fused")
    assert verdict["kept"] == "averaged" and verdict["answered"] == 1 and verdict["examples"] == 50
    assert [r["node-id"] for r in verdict["rejected"]] == [2]
    assert next(iter(bad)) in verdict["rejected"][0]["reason"]


def test_a_reply_missing_a_candidate_or_with_two_metric_records_does_not_count():
    missing = Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "averaged-accuracy": 0.1,
                                                           "averaged-loss": 2.0})}), reply_to=request(2))
    doubled = Message(RecordDict({"a": MetricRecord({"num-examples": 10}), "b": MetricRecord({})}),
                      reply_to=request(3))
    verdict = choose([scores(1, 10, 0.2, 0.9), missing, doubled], "averaged")
    assert verdict["kept"] == "fused" and verdict["answered"] == 1
    assert [r["node-id"] for r in verdict["rejected"]] == [2, 3]
    assert "'fused-accuracy' = None" in verdict["rejected"][0]["reason"]


def test_a_failed_reply_does_not_count():
    failed = Message(Error(code=0, reason="ClientApp raised"), reply_to=request(2))
    verdict = choose([scores(1, 10, averaged=0.4, fused=0.6), failed], "averaged")
    assert verdict["kept"] == "fused" and verdict["failed"] == [2] and verdict["answered"] == 1


def test_with_no_valid_answer_the_proxy_criterion_decides_and_the_log_says_so(caplog):
    grid = ScriptedGrid({}, connected=[5, 6, 7])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        verdict = FusionCheck(1.0, 1, 5.0, seed=0).run(grid, {5: (0, 3), 6: (1, 3), 7: (2, 3)}, 4,
                                                       {"averaged": AVERAGED, "fused": FUSED}, "fused")
    assert verdict["kept"] == "fused" and verdict["by"] == "proxy" and verdict["asked"] == 3
    assert any("round 4: fusion check: no valid reply from the 3 node(s) asked" in r.getMessage()
               and "proxy criterion keeps the fused model" in r.getMessage() for r in caplog.records)
    failed = Message(Error(code=0, reason="boom"), reply_to=request(2))
    assert choose([failed], "averaged")["by"] == "proxy"


def test_one_evaluate_message_per_sampled_node_carries_both_candidates_and_its_partition():
    grid = ScriptedGrid({node: (10, 0.5, 0.6) for node in (11, 22, 33, 44)})
    placements = {11: (3, 4), 22: (0, 4), 33: (1, 4), 44: (2, 4)}
    check = FusionCheck(fraction=0.5, min_nodes=1, timeout=7.0, seed=3)
    verdict = check.run(grid, placements, 2, {"averaged": AVERAGED, "fused": FUSED}, "fused")
    assert verdict["asked"] == len(grid.sent) == 2 and verdict["answered"] == 2
    # Two models to each of two nodes, as serialised on the wire (a float32[4] is 16 bytes plus its header).
    assert verdict["bytes-sent"] == 2 * sum(len(a.data) for r in (AVERAGED, FUSED) for a in r.values()) > 2 * 32
    for message in grid.sent:
        assert message.metadata.message_type == "evaluate" and message.metadata.ttl == 7.0
        assert set(message.content.array_records) == {"averaged", "fused"}
        config = message.content["config"]
        assert (config["partition-id"], config["num-partitions"]) == placements[message.metadata.dst_node_id]
        assert config["server-round"] == 2
    # The same seed and round ask the same nodes again; min-nodes raises a small fraction.
    again = ScriptedGrid(grid.answers)
    check.run(again, placements, 2, {"averaged": AVERAGED, "fused": FUSED}, "fused")
    assert [m.metadata.dst_node_id for m in again.sent] == [m.metadata.dst_node_id for m in grid.sent]
    wide = ScriptedGrid(grid.answers)
    FusionCheck(fraction=0.25, min_nodes=3, timeout=7.0, seed=3).run(
        wide, placements, 2, {"averaged": AVERAGED, "fused": FUSED}, "fused")
    assert len(wide.sent) == 3


class FusingDistillation:
    """Stands in for a fuse-back: the fused model is the aggregate + 1; ``kept_step`` 0 means the proxy kept it."""

    fuses_back = True

    def __init__(self, kept_step: int):
        self.kept_step = kept_step

    def run(self, averaged, client_arrays, fuse=None):
        fused = ArrayRecord({k: Array(a.numpy() + np.float32(1)) for k, a in averaged["large"].items()})
        return {"large": fused}, {"seconds": 0.0, "global": {"kept-step": self.kept_step}}


def round_with_check(make_strategy, answers, received_accuracy=0.0, kept_step=40, nodes="trained"):
    """One round from a global model of zeros: every node sends 2s (averaged 2, fused 3) and scored the
    zeros at ``received_accuracy`` before training; ``answers`` script the check's replies."""
    strategy = make_strategy(distillation=FusingDistillation(kept_step), min_nodes=1,
                             fusion_check=FusionCheck(1.0, 1, 5.0, seed=0, nodes=nodes))
    grid = ScriptedGrid(answers)
    initial = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    list(strategy.configure_train(1, initial, ConfigRecord({}), grid))
    replies = [train_reply({"w": np.full(2, 2.0, np.float32)}, node,
                           {"num-examples": n, "eval-accuracy": received_accuracy, "eval-loss": 1.0})
               for node, (n, *_) in answers.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy(), strategy.round_stats[1]["fusion"], grid


def test_the_kept_candidate_is_the_model_the_next_round_and_the_server_get(make_strategy):
    kept, fusion, grid = round_with_check(make_strategy, {1: (10, 0.9, 0.3), 2: (10, 0.8, 0.4)})
    assert fusion["kept"] == "averaged" and fusion["by"] == "clients" and fusion["answered"] == 2
    np.testing.assert_array_equal(kept, [2.0, 2.0])  # the average of the replies, not the fused 3.0
    kept, fusion, _ = round_with_check(make_strategy, {1: (10, 0.3, 0.9)})
    assert fusion["kept"] == "fused"
    np.testing.assert_array_equal(kept, [3.0, 3.0])


def test_a_round_that_made_both_candidates_worse_than_its_start_keeps_the_model_it_started_from(make_strategy):
    kept, fusion, grid = round_with_check(make_strategy, {1: (10, 0.6, 0.7), 2: (30, 0.5, 0.6)},
                                          received_accuracy=0.8)
    assert fusion["kept"] == "previous"
    assert fusion["accuracy"] == pytest.approx({"averaged": 0.525, "fused": 0.625, "previous": 0.8})
    np.testing.assert_array_equal(kept, [0.0, 0.0])  # what this round sent out
    # Only this round's clients are asked (they scored the starting model on the same data): the averaged model
    # as soon as the round aggregated, the fused one once the Distiller made it.
    checks = [(m.metadata.dst_node_id, set(m.content.array_records)) for m in grid.sent
              if m.metadata.message_type == "evaluate"]
    assert checks == [(1, {"averaged"}), (2, {"averaged"}), (1, {"fused"}), (2, {"fused"})]


def idle_round(make_strategy, answers, fraction_train=1.0, min_nodes=1, failed=(), claims=None):
    """One round with fusion-check-nodes = 'idle' on the nodes of ``answers``: every sampled node but
    ``failed`` sends its train reply (``claims`` examples, default 10). Returns (verdict, sampled, asked)."""
    strategy = make_strategy(distillation=FusingDistillation(40), min_nodes=1, fraction_train=fraction_train,
                             fusion_check=FusionCheck(1.0, min_nodes, 5.0, seed=0, nodes="idle", max_ratio=4.0))
    grid = ScriptedGrid(answers)
    sampled = {m.metadata.dst_node_id for m in strategy.configure_train(
        1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord({}), grid)}
    strategy.aggregate_train(1, [train_reply({"w": np.full(2, 2.0, np.float32)}, node,
                                             {"num-examples": (claims or {}).get(node, 10), "eval-accuracy": 0.5,
                                              "eval-loss": 1.0}) for node in sorted(sampled - set(failed))])
    asked = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "evaluate"}
    return strategy.round_stats[1]["fusion"], sampled, asked


def test_with_idle_nodes_checking_the_nodes_not_sampled_to_train_score_the_candidates(make_strategy):
    # fusion-check-nodes = "idle": out of sample. 2 of 4 nodes train; the other 2 are asked. They hold no
    # score of the starting model, so it is no candidate.
    answers = {1: (10, 0.3, 0.9), 2: (30, 0.5, 0.6), 3: (10, 0.3, 0.9), 4: (30, 0.5, 0.6)}
    fusion, sampled, asked = idle_round(make_strategy, answers, fraction_train=0.5)
    assert len(sampled) == 2 and asked == {1, 2, 3, 4} - sampled
    assert fusion["kept"] == "fused" and fusion["answered"] == 2 and set(fusion["accuracy"]) == {"averaged", "fused"}


def test_a_node_sampled_to_train_whose_reply_failed_is_no_idle_node(make_strategy):
    # all 3 sampled, node 3's train reply lost: no node is idle, so the round's clients with a reply check
    answers = {1: (10, 0.9, 0.3), 2: (10, 0.8, 0.4), 3: (10**9, 0.0, 1.0)}
    fusion, sampled, asked = idle_round(make_strategy, answers, failed=[3])
    assert sampled == {1, 2, 3} and asked == {1, 2}
    assert fusion["kept"] == "averaged" and "previous" in fusion["accuracy"]


def test_with_fewer_idle_nodes_than_min_nodes_the_rounds_clients_check(make_strategy):
    answers = {node: (10, 0.5, 0.6) for node in (1, 2, 3, 4)}
    fusion, sampled, asked = idle_round(make_strategy, answers, fraction_train=0.5, min_nodes=3)
    assert len(sampled) == 2 and asked == sampled and fusion["answered"] == 2
    fusion, sampled, asked = idle_round(make_strategy, answers, fraction_train=0.5, min_nodes=2)
    assert asked == {1, 2, 3, 4} - sampled


def test_an_idle_nodes_unchecked_example_count_weighs_at_most_max_examples_ratio_times_the_rounds_median():
    # the round's train replies claimed 50 each (checked); an idle node claiming 10^9 weighs 4 x 50 = 200
    check = FusionCheck(1.0, 1, 5.0, seed=0, nodes="idle", max_ratio=4.0)
    received = {1: {"num-examples": 50}, 2: {"num-examples": 50}}
    replies = [scores(3, 150, 0.9, 0.1), scores(4, 10**9, 0.1, 0.9)]
    verdict = choose(replies, "fused", received=received, max_ratio=check.max_ratio)
    assert verdict["examples"] == 150 + 200
    assert verdict["accuracy"]["averaged"] == pytest.approx((150 * 0.9 + 200 * 0.1) / 350)
    assert choose(replies, "fused", received=received)["examples"] == 150 + 10**9  # max-examples-ratio 0: no cap


def test_the_averaged_model_is_sent_to_the_checking_nodes_before_distillation_starts(make_strategy):
    seen = []

    class Watching(FusingDistillation):
        def run(self, averaged, client_arrays, fuse=None):
            seen.extend(set(m.content.array_records) for m in grid.sent if m.metadata.message_type == "evaluate")
            return super().run(averaged, client_arrays, fuse)

    grid = ScriptedGrid({1: (10, 0.3, 0.9), 2: (10, 0.4, 0.8)})
    strategy = make_strategy(distillation=Watching(40), min_nodes=1, fusion_check=FusionCheck(1.0, 1, 5.0, seed=0))
    list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord({}), grid))
    strategy.aggregate_train(1, [train_reply({"w": np.full(2, 2.0, np.float32)}, node, {"num-examples": 10})
                                 for node in (1, 2)])
    assert seen == [{"averaged"}, {"averaged"}]  # while the server distils, the nodes score the averaged model
    assert strategy.round_stats[1]["fusion"]["kept"] == "fused"


def test_a_node_that_answers_one_of_its_two_messages_is_silent_and_one_that_names_two_counts_is_rejected():
    check = FusionCheck(1.0, 1, 0.3, seed=0)
    grid = ScriptedGrid({1: (10, 0.9, 0.1), 2: (10, 0.2, 0.8), 3: (10, 0.2, 0.8)})
    placements = {1: (0, 3), 2: (1, 3), 3: (2, 3)}
    first = check.ask(grid, [1, 2, 3], placements, 1, {"averaged": AVERAGED})
    second = check.ask(grid, [1, 2, 3], placements, 1, {"fused": FUSED})
    # node 1 answers the averaged model's message only: its fused one is never answered
    grid.pending = {mid: m for mid, m in grid.pending.items() if not (m.metadata.dst_node_id == 1 and mid in second.ids)}
    original = grid.pull_messages

    def pull(ids):  # node 3 names another example count in its second reply
        replies = original(ids)
        for reply in replies:
            if reply.metadata.src_node_id == 3 and "fused-accuracy" in reply.content["metrics"]:
                reply.content["metrics"]["num-examples"] = 11
        return replies

    grid.pull_messages = pull
    verdict = check.collect(grid, [first, second], 1, "averaged")
    assert verdict["asked"] == 3 and verdict["answered"] == 1 and verdict["kept"] == "fused"  # node 2 alone counts
    assert verdict["rejected"] == [{"node-id": 3, "reason": "'num-examples' differs between its replies (10, 11)"}]
    assert verdict["bytes-sent"] == 3 * sum(len(a.data) for r in (AVERAGED, FUSED) for a in r.values())


@pytest.mark.parametrize("previous, margin, kept", [
    (0.72, 0.02, "fused"),      # 2 points above the fused model: within the margin, the round goes on
    (0.73, 0.02, "previous"),   # 3 points above: the round made the model clearly worse, it is not kept
    (0.71, 0.0, "previous"),    # margin 0: any gain keeps the starting model
    (0.99, 1.0, "fused"),       # margin 1: never roll back
])
def test_the_starting_model_is_kept_only_when_it_beats_both_new_candidates_by_more_than_the_margin(
        previous, margin, kept):
    received = {1: {"num-examples": 100, "eval-accuracy": previous, "eval-loss": 1.0}}
    assert choose([scores(1, 100, 0.6, 0.7)], "fused", received=received, margin=margin)["kept"] == kept


@pytest.mark.parametrize("bad", [{"eval-accuracy": 50.0}, {"eval-accuracy": float("nan")}, {"eval-loss": -1.0},
                                 {"eval-loss": None}])
def test_an_invalid_score_of_the_starting_model_in_a_train_reply_is_no_score(bad):
    received = {1: {"num-examples": 10, "eval-accuracy": 0.99, "eval-loss": 0.1, **bad},
                2: {"num-examples": 1000, "eval-accuracy": 0.5, "eval-loss": 1.0}}
    received[1] = {k: v for k, v in received[1].items() if v is not None}
    verdict = choose([scores(1, 10, 0.6, 0.7), scores(2, 1000, 0.6, 0.7)], "fused", received=received, margin=0.02)
    assert verdict["kept"] == "fused" and "previous" not in verdict["accuracy"]  # it cannot force a rollback


def test_a_diverged_candidate_still_counts_by_its_accuracy_and_its_loss_is_recorded_as_none():
    diverged = scores(1, 10, 0.6, 0.1)
    diverged.content["metrics"]["fused-loss"] = float("inf")
    verdict = choose([diverged], "fused")
    assert verdict["kept"] == "averaged" and verdict["answered"] == 1 and verdict["loss"]["fused"] is None
    assert json.loads(json.dumps(verdict))["loss"]["fused"] is None  # metrics.jsonl stays valid JSON


def test_a_check_reply_whose_example_count_differs_from_its_train_reply_does_not_count():
    received = {1: {"num-examples": 10, "eval-accuracy": 0.5, "eval-loss": 1.0}, 2: {"num-examples": 99, "eval-accuracy": 0.5, "eval-loss": 1.0}}
    verdict = choose([scores(1, 10, 0.6, 0.7), scores(2, 1000, 0.0, 1.0)], "fused", received=received)
    assert verdict["kept"] == "fused" and verdict["answered"] == 1
    assert "differs from the 99 of its train reply" in verdict["rejected"][0]["reason"]
    assert verdict["accuracy"] == pytest.approx({"averaged": 0.6, "fused": 0.7, "previous": 0.5})


def test_when_the_proxy_kept_the_averaged_model_only_it_is_sent_and_checked_against_the_start(make_strategy):
    kept, fusion, grid = round_with_check(make_strategy, {1: (10, 0.9, 0.0)}, received_accuracy=0.5, kept_step=0)
    checks = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert [set(m.content.array_records) for m in checks] == [{"averaged"}]
    assert fusion["kept"] == "averaged" and set(fusion["accuracy"]) == {"averaged", "previous"}
    np.testing.assert_array_equal(kept, [2.0, 2.0])


def test_without_a_check_the_proxy_criterion_alone_decides(make_strategy):
    strategy = make_strategy(distillation=FusingDistillation(0), min_nodes=1)
    grid = ScriptedGrid({1: (10, 0.1, 0.9)})
    list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord({}), grid))
    arrays, _ = strategy.aggregate_train(1, [train_reply({"w": np.full(2, 2.0, np.float32)}, 1, {"num-examples": 10})])
    assert strategy.round_stats[1]["fusion"] == {"kept": "averaged", "by": "proxy"}
    assert not [m for m in grid.sent if m.metadata.message_type == "evaluate"]


@pytest.fixture
def clientapp_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


def test_the_client_scores_every_model_in_the_message_on_its_own_data(raw_config, clientapp_identity):
    config = RunConfig.from_mapping(raw_config)
    data = client_set(config, 1, 3)
    torch.manual_seed(0)
    averaged, fused = (build_teacher(data.input_shape, data.num_classes) for _ in range(2))
    content = RecordDict({"averaged": ArrayRecord(averaged.state_dict()), "fused": ArrayRecord(fused.state_dict()),
                          "config": ConfigRecord({"server-round": 1, "partition-id": 1, "num-partitions": 3})})
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=raw_config)
    metrics = evaluate_local(Message(content, dst_node_id=7, message_type="evaluate"), context).content["metrics"]
    cpu = setup_compute("cpu")
    assert metrics["num-examples"] == len(data)
    for name, model in (("averaged", averaged), ("fused", fused)):
        expected = evaluate(model, data, cpu)
        assert metrics[f"{name}-accuracy"] == pytest.approx(expected["accuracy"])
        assert metrics[f"{name}-loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert set(metrics) == {"num-examples", "averaged-accuracy", "averaged-loss", "fused-accuracy", "fused-loss"}


@pytest.mark.parametrize("key, value, allowed", [
    ("fusion-check", "server", "one of 'clients', 'proxy'"),
    ("fusion-check", "", "one of 'clients', 'proxy'"),
    ("fusion-check-fraction", 0.0, "a number > 0 and <= 1"),
    ("fusion-check-fraction", 1.5, "a number > 0 and <= 1"),
    ("fusion-check-nodes", "all", "one of 'idle', 'trained'"),
])
def test_bad_values_of_the_fusion_check_keys_are_refused_at_start(raw_config, key, value, allowed):
    raw_config[key] = value
    with pytest.raises(ConfigError, match=f"'{key}' = {value!r} is not allowed; use {allowed}"):
        RunConfig.from_mapping(raw_config)
