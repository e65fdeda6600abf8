"""Differential privacy: clipping, noise of the stated scale, and an ε that is the accountant's own."""

import math
import sys
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from client.local_dp import local_dp
from common.config import ConfigError
from common.data import pool_size
from server.privacy import CentralDP, PrivacyLedger, _accountant, local_noise_multiplier, with_privacy
from server.strategy import DistillStrategy
from tests.fakes import FakeGrid, train_reply

SIZE = 10_000  # weights per model: enough for a tight estimate of the noise's standard deviation


pytestmark = pytest.mark.usefixtures("serverapp_identity")


def reply(update: np.ndarray, node_id: int, num_examples: int = 10) -> Message:
    return train_reply({"w": update.astype(np.float32)}, node_id, {"num-examples": num_examples, "train-loss": 0.5})


def fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1)


def run_round(strategy, updates, server_round=1, num_examples=None):
    """One round from a zero global model: configure for len(updates) nodes, aggregate their replies."""
    nodes = list(range(1, len(updates) + 1))
    strategy.configure_train(server_round, ArrayRecord({"w": Array(np.zeros(SIZE, np.float32))}),
                             ConfigRecord({}), FakeGrid(nodes))
    replies = [reply(u, n, (num_examples or [10] * len(updates))[i]) for i, (u, n) in enumerate(zip(updates, nodes))]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays["w"].numpy() if arrays is not None else None, replies


def direction(norm: float, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=SIZE)
    return v / np.linalg.norm(v) * norm


def test_clipping_bounds_every_client_update_by_the_clipping_norm():
    strategy = DistillStrategy(CentralDP(fedavg(), noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=1))
    _, replies = run_round(strategy, [direction(n, i) for i, n in enumerate((0.5, 3.0, 100.0))])
    norms = [np.linalg.norm(r.content["arrays"]["w"].numpy()) for r in replies]
    assert norms[0] == pytest.approx(0.5, rel=1e-5) and all(n <= 1.0 + 1e-5 for n in norms)


def test_central_dp_without_noise_is_fedavg_of_clipped_updates_with_equal_weights():
    updates = [direction(n, i) for i, n in enumerate((0.5, 3.0, 100.0))]
    dp, _ = run_round(DistillStrategy(CentralDP(fedavg(), 0.0, 1.0, 1)), updates, num_examples=[10, 20, 70])
    clipped, _ = run_round(DistillStrategy(fedavg(), max_update_norm=1.0), updates, num_examples=[1, 1, 1])
    np.testing.assert_allclose(dp, clipped, atol=1e-6)


def test_central_noise_has_standard_deviation_noise_multiplier_times_clipping_norm_over_clients():
    updates = [direction(0.2, i) for i in range(4)]  # under the clipping norm: only noise changes them
    noised, _ = run_round(DistillStrategy(CentralDP(fedavg(), 1.5, 2.0, 1)), updates)
    deviation = noised - np.mean(updates, axis=0)
    assert np.std(deviation) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)  # σ·C/m, m = the round's 4 clients
    assert abs(np.mean(deviation)) < 0.02


def central(config, noise):
    return with_privacy(fedavg(), replace(config, dp="central", dp_noise_multiplier=noise, dp_clipping_norm=1.0))


def test_epsilon_is_the_accountants_and_grows_with_rounds_and_shrinks_with_noise(config):
    epsilons = {}
    for noise in (0.7, 1.5):
        aggregator, ledger = central(config, noise)
        strategy = DistillStrategy(aggregator)
        per_round = []
        for r in (1, 2, 3):
            run_round(strategy, [direction(0.5, i) for i in range(3)], server_round=r)
            per_round.append(ledger.record_round(strategy.round_stats[r])["epsilon"])
        direct = _accountant(ledger.delta, 1)
        direct.compose(GaussianPrivacyEvent(noise, 1, 1), count=3)
        assert per_round[-1] == pytest.approx(direct.get_epsilon(ledger.delta), rel=1e-9)
        assert per_round[0] < per_round[1] < per_round[2]
        epsilons[noise] = per_round[-1]
    assert epsilons[1.5] < epsilons[0.7]
    assert ledger.delta == 1 / pool_size(config) and 1000 < pool_size(config) < 1100  # 60 % of digits' 1,797


def test_a_round_with_a_failed_or_rejected_client_spends_no_epsilon_and_keeps_the_model(config):
    aggregator, ledger = central(config, 1.0)
    strategy = DistillStrategy(aggregator)
    updates = [direction(0.5, 0), direction(0.5, 1), np.full(SIZE, np.nan)]
    aggregate, _ = run_round(strategy, updates)
    assert aggregate is None and ledger.record_round(strategy.round_stats[1])["releases"] == 0


def test_a_delta_above_one_over_the_pool_is_warned_about_and_the_default_is_not(config, caplog):
    PrivacyLedger(replace(config, dp="local"), pool_size=1000)
    assert "dp-delta" not in caplog.text
    PrivacyLedger(replace(config, dp="local", dp_delta=0.01), pool_size=1000)
    assert "dp-delta = 0.01 is more than 1 / the 1000 pool examples" in caplog.text


def test_local_epsilon_is_per_client_and_counts_the_rounds_each_client_trained_in(config):
    ledger = PrivacyLedger(replace(config, dp="local", dp_local_epsilon=4.0), pool_size=1000)
    for nodes in ([1, 2], [1], [1, 3]):
        privacy = ledger.record_round({"heard-from": nodes})
    direct = _accountant(0.001, 1)
    direct.compose(GaussianPrivacyEvent(local_noise_multiplier(4.0, 0.001), 1, 1), count=3)  # node 1: 3 rounds
    assert privacy["releases"] == 3 and privacy["epsilon"] == pytest.approx(direct.get_epsilon(0.001))

    # Resumed with new node IDs (a new simulation): releases before count for every client, never fewer.
    resumed = PrivacyLedger(replace(config, dp="local", dp_local_epsilon=4.0), pool_size=1000)
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.record_round({"heard-from": [77, 78]})["releases"] == 4


def test_a_local_dp_reply_is_the_clipped_update_plus_noise_of_the_configured_scale(raw_config):
    raw = {**raw_config, "dp": "local", "dp-clipping-norm": 1.0, "dp-local-epsilon": 5.0}
    received = np.zeros(SIZE, np.float32)
    request = Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(received)}),
                                          "config": ConfigRecord({"dp-delta": 1e-3})}),
                      dst_node_id=1, message_type="train")
    trained = direction(10.0, 7)

    def train(msg, context):
        return Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(trained.astype(np.float32))}),
                                           "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=raw)
    sent = local_dp(request, context, train).content["arrays"]["w"].numpy()
    noise = sent - trained / 10.0  # the update clipped from norm 10 to 1
    assert np.std(noise) == pytest.approx(2 * 1.0 * math.sqrt(2 * math.log(1.25 / 1e-3)) / 5.0, rel=0.03)  # 2C·…/ε


def test_local_dp_leaves_evaluate_messages_and_runs_without_dp_alone(raw_config):
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=raw_config)
    request = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    marker = object()
    assert local_dp(request, context, lambda msg, ctx: marker) is marker  # dp = "off": untouched


def test_central_dp_with_the_ensemble_teacher_or_a_robust_aggregation_is_refused_at_start(raw_config):
    from common.config import RunConfig

    with pytest.raises(ConfigError, match="'dp' = 'central' with 'distill' = 'ensemble' is refused: the ensemble "
                                          "teacher reads each client's own model"):
        RunConfig.from_mapping({**raw_config, "dp": "central", "distill": "ensemble"})
    with pytest.raises(ConfigError, match="'aggregation' = 'median' is refused"):
        RunConfig.from_mapping({**raw_config, "dp": "central", "aggregation": "median"})
    RunConfig.from_mapping({**raw_config, "dp": "local", "distill": "ensemble", "aggregation": "median"})


def test_without_the_dp_extra_the_message_names_it(config, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ConfigError, match=r"pip install '.\[dp\]'"):
        central(config, 1.0)
