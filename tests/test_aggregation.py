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

    fuses_back = False

    def __init__(self):
        self.calls = []

    def run(self, averaged, client_arrays, fuse=None):
        self.calls.append((averaged["large"]["w"].numpy().copy(), [a["w"].numpy().copy() for _, a in client_arrays]))
        return averaged, {"seconds": 0.0}


def start_round(strategy, nodes):
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), FakeGrid(nodes))


# Five clients, one of them sends an update 1e30 times too large.
HONEST = [1.0, 2.0, 3.0, 4.0]
SURVIVES_A_HUGE_UPDATE = {  # aggregation, extra settings -> the aggregate's value
    ("fedavg", ()): None,  # ruined
    ("fedavg", (("max_update_norm", 4.0),)): "bounded",
    ("fedprox", ()): None,  # its server side is FedAvg
    ("fedavgm", ()): None,
    ("fedadam", ()): 0.0,  # unmoved: Δ² overflows float32, v = inf, the step is 0 (and stays 0)
    ("trimmed-mean", ()): 3.0,  # beta 0.2 of 5 cuts one from each end: mean(2, 3, 4)
    ("median", ()): 3.0,
}


@pytest.mark.filterwarnings("ignore:overflow encountered in square:RuntimeWarning")  # fedadam's v
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


# --- fedprox, fedavgm, fedadam -------------------------------------------------------------------------------

def strategy_for(config, aggregation, distillation=None, **settings):
    """The ServerApp's strategy around ``aggregation`` with the given run-config attributes (snake_case)."""
    from dataclasses import replace

    from server.aggregation import build_aggregator
    from server.strategy import DistillStrategy

    if aggregation == "fedprox":
        settings.setdefault("proximal_mu", 0.1)
    return DistillStrategy(build_aggregator(replace(config, aggregation=aggregation, **settings)), distillation)


def arrays_of(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def weighted_reply(values: dict[str, np.ndarray], node_id: int, num_examples: int) -> Message:
    return train_reply(values, node_id, {"num-examples": num_examples, "train-loss": 0.5})


def play_round(strategy, server_round, sent: dict[str, np.ndarray], clients, weights) -> dict[str, np.ndarray]:
    """configure_train with ``sent`` (FakeGrid), then aggregate_train of the hand-made client models."""
    nodes = list(range(1, len(clients) + 1))
    strategy.configure_train(server_round, arrays_of(sent), ConfigRecord({}), FakeGrid(nodes))
    arrays, _ = strategy.aggregate_train(
        server_round, [weighted_reply(c, n, w) for c, n, w in zip(clients, nodes, weights)])
    assert not strategy.round_stats[server_round]["rejected"]
    return {k: a.numpy() for k, a in arrays.items()}


RNG = np.random.default_rng(0)
W0 = {"w": RNG.normal(size=(3, 2)).astype(np.float32), "b": RNG.normal(size=3).astype(np.float32)}
ROUND_1 = [{k: v + RNG.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in W0.items()} for _ in range(3)]
WEIGHTS = [10, 30, 60]


def weighted_mean(clients, weights):
    n = sum(weights)
    return {k: sum(np.float64(w) / n * c[k].astype(np.float64) for c, w in zip(clients, weights)) for k in clients[0]}


@pytest.mark.parametrize("aggregation", ["fedavg", "fedprox", "fedavgm", "fedadam", "trimmed-mean", "median"])
def test_every_aggregation_builds_and_summarises(config, aggregation, caplog):
    from common.config import AGGREGATIONS

    assert aggregation in AGGREGATIONS
    strategy_for(config, aggregation).summary()
    assert "fl-distill: training 100% of the nodes a round" in caplog.text


def test_fedprox_instruction_carries_proximal_mu(config):
    strategy = strategy_for(config, "fedprox", proximal_mu=0.25)
    messages = strategy.configure_train(1, arrays_of(W0), ConfigRecord({}), FakeGrid([1, 2]))
    assert len(messages) == 2
    for message in messages:
        record = message.content["config"]
        assert record["proximal-mu"] == 0.25
        assert {"server-round", "partition-id", "num-partitions"} <= set(record.keys())


def test_fedprox_proximal_term_keeps_local_training_near_the_received_model():
    import torch
    from torch import nn

    from common.data import Dataset
    from common.training import train_local

    generator = torch.Generator().manual_seed(0)
    data = Dataset("tiny", torch.randn(64, 1, 2, 2, generator=generator), torch.randint(0, 3, (64,), generator=generator),
                   ("a", "b", "c"))

    def distance_after(mu):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        start = [p.detach().clone() for p in model.parameters()]
        metrics = train_local(model, data, epochs=5, batch_size=16, lr=0.1, device=torch.device("cpu"), seed=1,
                              proximal_mu=mu)
        assert set(metrics) == {"train-loss", "train-accuracy"}
        return sum((p.detach() - s).pow(2).sum() for p, s in zip(model.parameters(), start)).sqrt().item()

    free, held = distance_after(0.0), distance_after(10.0)
    assert 0 < held < 0.5 * free


def test_client_train_passes_proximal_mu_from_the_message(monkeypatch, raw_config):
    import torch

    import client.client_app as client_app
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from common.data import Dataset
    from common.models import build_teacher

    seen = []
    monkeypatch.setattr(client_app, "train_local", lambda *a, proximal_mu=0.0, **k: seen.append(proximal_mu) or {})
    data = Dataset("tiny", torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), ("a", "b"))
    monkeypatch.setattr(client_app, "local_data", lambda *a: data)
    model = build_teacher(data.input_shape, data.num_classes)
    TaskIdentity.node_id = 7
    for extra, expected in (({"proximal-mu": 0.5}, 0.5), ({}, 0.0)):
        config = ConfigRecord({"server-round": 1, "partition-id": 0, "num-partitions": 1, **extra})
        request = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
                          dst_node_id=7, message_type="train")
        context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=raw_config)
        client_app.train(request, context)
    assert seen == [0.5, 0.0]


def test_fedavgm_with_momentum_0_is_fedavg_over_two_rounds(config):
    results = {}
    for aggregation in ("fedavg", "fedavgm"):
        strategy = strategy_for(config, aggregation, server_momentum=0.0)
        w1 = play_round(strategy, 1, W0, ROUND_1, WEIGHTS)
        results[aggregation] = (w1, play_round(strategy, 2, w1, next_round_clients(w1, 2), WEIGHTS))
    for fedavg, fedavgm in zip(results["fedavg"], results["fedavgm"]):
        for k in W0:
            np.testing.assert_array_equal(fedavg[k], fedavgm[k])
            assert fedavgm[k].dtype == np.float32


class ShiftingDistillation:
    """Stands in for distill-target 'global': the model that goes out differs from the aggregate."""

    fuses_back = True

    def run(self, averaged, client_arrays, fuse=None):
        shifted = arrays_of({k: a.numpy() + np.float32(0.5) for k, a in averaged["large"].items()})
        return {"large": shifted}, {"seconds": 0.0, "global": {"kept-step": 150}}


def next_round_clients(sent, delta_seed):
    """Client models of a round: the model sent plus small float32 updates (clients train float32 models)."""
    rng = np.random.default_rng(delta_seed)
    return [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in sent.items()}
            for _ in WEIGHTS]


@pytest.mark.parametrize("distilled", [False, True])
def test_fedavgm_momentum_steps_from_the_model_that_was_sent(config, distilled):
    """Hsu et al. 2019: Δ_t = w_t − Σ n_i/n·w_i with w_t the model the clients received, v_t = β·v_{t−1} + Δ_t,
    w_{t+1} = w_t − v_t. With distillation, w_t is the distilled model; Flower's own copy would be the
    undistilled one, and its momentum would carry the distillation step as if clients had made it (round 3 on)."""
    beta, shift = 0.9, (0.5 if distilled else 0.0)
    strategy = strategy_for(config, "fedavgm", ShiftingDistillation() if distilled else None, server_momentum=beta)
    sent, v = W0, {k: np.zeros_like(a, dtype=np.float64) for k, a in W0.items()}
    for server_round in (1, 2, 3):
        clients = ROUND_1 if server_round == 1 else next_round_clients(sent, server_round)
        new = play_round(strategy, server_round, sent, clients, WEIGHTS)
        avg = weighted_mean(clients, WEIGHTS)
        for k in W0:
            v[k] = beta * v[k] + (sent[k] - avg[k])
            np.testing.assert_allclose(new[k], sent[k] - v[k] + shift, atol=1e-5, err_msg=f"round {server_round}")
            assert new[k].dtype == np.float32
        sent = new


def fedadam_step(w, avg, m, v, server_round, eta, tau, beta_1=0.9, beta_2=0.99):
    """Reddi et al. 2021 Alg. 2 with Flower's bias-corrected rate (fedadam.py: eta_norm, exponent round + 1)."""
    delta = avg - w
    m = beta_1 * m + (1 - beta_1) * delta
    v = beta_2 * v + (1 - beta_2) * delta**2
    eta_t = eta * np.sqrt(1 - beta_2 ** (server_round + 1)) / (1 - beta_1 ** (server_round + 1))
    return w + eta_t * m / (np.sqrt(v) + tau), m, v


def test_fedadam_first_step_is_its_formula(config):
    eta, tau = 0.05, 0.01
    strategy = strategy_for(config, "fedadam", server_lr=eta, server_tau=tau)
    assert (strategy.aggregator.first.beta_1, strategy.aggregator.first.beta_2) == (0.9, 0.99)
    w1 = play_round(strategy, 1, W0, ROUND_1, WEIGHTS)
    avg = weighted_mean(ROUND_1, WEIGHTS)
    for k in W0:
        expected, _, _ = fedadam_step(W0[k].astype(np.float64), avg[k], 0.0, 0.0, 1, eta, tau)
        np.testing.assert_allclose(w1[k], expected, atol=1e-6)
        assert w1[k].dtype == np.float32  # Flower's step returns float64; clients reply float32


@pytest.mark.parametrize("distilled", [False, True])
def test_fedadam_second_step_starts_from_the_model_that_was_sent(config, distilled):
    eta, tau = 0.05, 0.01
    strategy = strategy_for(config, "fedadam", ShiftingDistillation() if distilled else None, server_lr=eta,
                            server_tau=tau)
    w1 = play_round(strategy, 1, W0, ROUND_1, WEIGHTS)
    round_2 = next_round_clients(w1, 2)
    w2 = play_round(strategy, 2, w1, round_2, WEIGHTS)  # float32 replies accepted: no dtype rejection
    avg1, avg2 = weighted_mean(ROUND_1, WEIGHTS), weighted_mean(round_2, WEIGHTS)
    shift = 0.5 if distilled else 0.0
    for k in W0:
        _, m, v = fedadam_step(W0[k].astype(np.float64), avg1[k], 0.0, 0.0, 1, eta, tau)
        expected, _, _ = fedadam_step(w1[k].astype(np.float64), avg2[k], m, v, 2, eta, tau)
        np.testing.assert_allclose(w2[k], expected + shift, atol=1e-5)
