"""dp = "example": DP-SGD on each client through Opacus, composed per client by the server's ledger."""

from dataclasses import replace

import pytest
import torch

from client.example_dp import train_private
from common.data import client_set
from common.models import build_model
from server.privacy import ExampleLedger, central_noise_problem, dp_sgd_epsilon, dp_sgd_rounds
from tests.fakes import train_reply

pytest.importorskip("opacus")
DELTA = 1e-4


@pytest.fixture
def private(config):
    return replace(config, dp="example")


def train(config, seed=0):
    data = client_set(config, 0, 10)
    torch.manual_seed(0)
    model = build_model("large", data.input_shape, data.num_classes)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_private(model, data, config, torch.device("cpu"), seed, DELTA)
    return model, before, metrics, len(data)


def test_a_client_trains_with_dp_sgd_and_reports_its_round_as_the_server_accounts_it(private):
    model, before, metrics, n = train(private)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # trained in place
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # Opacus's hooks gone
    assert metrics["dp-sample-rate"] == pytest.approx(1 / -(-n // private.batch_size))  # q = 1 / batches an epoch
    assert metrics["dp-steps"] == private.local_epochs * -(-n // private.batch_size)
    assert metrics["dp-noise-multiplier"] == private.dp_example_noise_multiplier
    mechanism = (metrics["dp-noise-multiplier"], metrics["dp-sample-rate"], metrics["dp-steps"])
    assert metrics["dp-epsilon"] == pytest.approx(dp_sgd_epsilon([mechanism], DELTA))  # Opacus's accountant, both ends


def test_a_target_epsilon_sizes_the_noise_so_the_whole_run_stays_within_it(private):
    config = replace(private, dp_example_epsilon=3.0, num_server_rounds=4)
    _, _, metrics, _ = train(config)
    mechanism = (metrics["dp-noise-multiplier"], metrics["dp-sample-rate"], metrics["dp-steps"])
    assert metrics["dp-noise-multiplier"] != config.dp_example_noise_multiplier
    assert 2.5 < dp_sgd_epsilon([mechanism] * config.num_server_rounds, DELTA) <= 3.0 + 1e-6


def test_the_same_seed_trains_the_same_private_model(private):
    first, _, _, _ = train(private, seed=3)
    again, _, _, _ = train(private, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def replies_of(round_rows, partitions=None):
    return [train_reply({"w": torch.zeros(2).numpy()}, node, {"num-examples": 10, "dp-noise-multiplier": s,
                                                              "dp-sample-rate": q, "dp-steps": k, "dp-epsilon": 1.0,
                                                              "partition-id": (partitions or {}).get(node, -1)})
            for node, (s, q, k) in round_rows.items()]


@pytest.mark.usefixtures("serverapp_identity")  # replies are Flower Messages
def test_the_ledger_composes_each_clients_rounds_and_reports_the_worst_client(private):
    ledger = ExampleLedger(private, pool_size=1000)
    m = (1.0, 0.1, 10)
    first = ledger.record_round({"dp-replies": dp_sgd_rounds(replies_of({1: m, 2: m}))})
    second = ledger.record_round({"dp-replies": dp_sgd_rounds(replies_of({1: m}))})  # node 2 not sampled
    assert first["epsilon"] == pytest.approx(dp_sgd_epsilon([m], ledger.delta))
    assert second["epsilon"] == pytest.approx(dp_sgd_epsilon([m, m], ledger.delta))
    assert second["epsilon"] > first["epsilon"]
    assert second["unit"] == "example" and second["releases"] == 20 and ledger.delta == 1 / 1000
    resumed = ExampleLedger(private, pool_size=1000)
    resumed.load_state_dict(ledger.state_dict())
    after = resumed.record_round({"dp-replies": dp_sgd_rounds(replies_of({7: m}))})  # a new node ID after the resume
    assert after["epsilon"] == pytest.approx(dp_sgd_epsilon([m, m, m], ledger.delta))  # never an undercount


@pytest.mark.usefixtures("serverapp_identity")
def test_the_rounds_of_two_nodes_on_one_partition_compose_as_one_clients_data(private):
    """Nodes 1 and 2 trained partition 3's examples (more nodes than partitions): its ε composes both rounds."""
    ledger = ExampleLedger(private, pool_size=1000)
    m = (1.0, 0.1, 10)
    shared = ledger.record_round({"dp-replies": dp_sgd_rounds(replies_of({1: m, 2: m}, partitions={1: 3, 2: 3}))})
    assert shared["epsilon"] == pytest.approx(dp_sgd_epsilon([m, m], ledger.delta))
    apart = ExampleLedger(private, pool_size=1000).record_round(
        {"dp-replies": dp_sgd_rounds(replies_of({1: m, 2: m}, partitions={1: 3, 2: 4}))})
    assert apart["epsilon"] == pytest.approx(dp_sgd_epsilon([m], ledger.delta))


def test_a_budget_for_more_rounds_than_the_run_has_is_warned_of_at_start(private, caplog):
    with caplog.at_level("WARNING"):
        ExampleLedger(replace(private, dp_example_rounds=5, num_server_rounds=5), pool_size=1000)
        assert "dp-example-rounds" not in caplog.text
        ExampleLedger(replace(private, dp_example_rounds=50, num_server_rounds=8), pool_size=1000)
    assert "dp-example-rounds = 50 is more than num-server-rounds = 8" in caplog.text


def test_noise_multiplier_zero_in_a_report_is_no_privacy_at_all():
    assert dp_sgd_epsilon([(0.0, 0.1, 10)], DELTA) == float("inf") and dp_sgd_epsilon([], DELTA) == 0.0


def test_central_dp_warns_when_its_noise_on_the_mean_outweighs_the_clipping_norm(config):
    data = client_set(config, 0, 10)
    weights = sum(p.numel() for p in build_model("large", data.input_shape, data.num_classes).parameters())
    # the default run: 10 clients a round, noise multiplier 1, C = 1, the large CNN on digits
    problem = central_noise_problem(weights, config.dp_noise_multiplier, config.dp_clipping_norm, 10)
    assert problem is not None and f"d = {weights:,}" in problem and f"m >= {int(weights ** 0.5) + 1:,}" in problem
    assert central_noise_problem(weights, 0.01, 1.0, 10) is None  # sqrt(d) * 0.01 / 10 < 1


def test_a_client_trains_at_most_dp_example_rounds_rounds_of_a_run_and_then_refuses_saying_why(private):
    from flwr.app import Context, RecordDict

    from client.example_dp import charge_round
    from common.config import ConfigError

    config = replace(private, dp_example_rounds=2, num_server_rounds=5)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    assert [charge_round(context, config), charge_round(context, config)] == [1, 2]
    with pytest.raises(ConfigError, match=r"trained 2 rounds of this run, all that dp-example-rounds = 2"):
        charge_round(context, config)
    every_round = replace(private, dp_example_rounds=0, num_server_rounds=3)  # 0: as many as the run has
    fresh = Context(run_id=1, node_id=8, node_config={}, state=RecordDict(), run_config={})
    assert [charge_round(fresh, every_round) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"\(0: num-server-rounds = 3\)"):
        charge_round(fresh, every_round)


def test_the_noise_is_sized_for_the_rounds_a_client_may_train_not_for_every_round_of_the_run(private):
    from client.example_dp import noise_multiplier

    target = replace(private, dp_example_epsilon=8.0, num_server_rounds=5, local_epochs=1)
    every_round, two_rounds = (noise_multiplier(replace(target, dp_example_rounds=k), 0.1, DELTA) for k in (0, 2))
    assert two_rounds < every_round
    assert dp_sgd_epsilon([(two_rounds, 0.1, 10)] * 2, DELTA) == pytest.approx(8.0, rel=0.02)
    assert dp_sgd_epsilon([(every_round, 0.1, 10)] * 5, DELTA) == pytest.approx(8.0, rel=0.02)
