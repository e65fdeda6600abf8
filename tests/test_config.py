"""The run config: pyproject defaults parse; bad values stop the run naming key, value and what is allowed."""

import pytest

from common.config import ConfigError, RunConfig


def test_defaults_parse_into_typed_config(config):
    assert config.dataset == "digits"
    assert config.distill == "global"
    assert isinstance(config.lr, float) and isinstance(config.num_server_rounds, int)
    assert RunConfig.from_mapping(config.to_mapping()) == config


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("dataset", "imagenet", "'digits', 'mnist-5k', 'mnist', 'fashion-mnist', 'cifar10'"),
        ("dirichlet-alpha", -1.0, "> 0"),
        ("fraction-train", 2.0, "<= 1"),
        ("partitioning", "random", "'iid', 'dirichlet', 'shards'"),
        ("distill", "maybe", "'off', 'global', 'ensemble'"),
        ("distill-temperature", 0.0, "> 0"),
        ("device", "tpu", "'auto', 'cpu', 'cuda'"),
        ("num-server-rounds", 0, ">= 1"),
        ("dp-noise-multiplier", float("inf"), ">= 0"),
        ("lr", float("nan"), "> 0"),
        ("seed", 2**70, "<= 9223372036854775807"),
        ("aggregation", "krum", "'fedavg', 'fedprox', 'fedavgm', 'fedadam', 'trimmed-mean', 'median'"),
        ("trimmed-mean-beta", 0.5, "< 0.5"),
        ("proximal-mu", -0.1, ">= 0"),
        ("server-momentum", 1.0, "< 1"),
        ("server-lr", 0.0, "> 0"),
        ("server-tau", 0.0, "> 0"),
        ("dp", "on", "'off', 'central', 'local', 'example'"),
        ("dp-example-noise-multiplier", 0.0, "> 0"),
        ("dp-example-epsilon", -1.0, ">= 0"),
        ("dp-example-clipping-norm", 0.0, "> 0"),
        ("dp-example-rounds", -1, "an integer >= 0 (0: num-server-rounds)"),
        ("record-updates", "0-x", "neither a partition number >= 0 nor a range a-b"),
    ],
)
def test_out_of_range_value_names_key_value_and_allowed(raw_config, key, value, allowed):
    raw_config[key] = value
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(raw_config)
    message = str(err.value)
    assert f"'{key}'" in message and repr(value) in message and allowed in message


def test_wrong_type_is_rejected(raw_config):
    raw_config["local-epochs"] = "three"
    with pytest.raises(ConfigError, match="'local-epochs' = 'three' has type str; expected int"):
        RunConfig.from_mapping(raw_config)


def test_unknown_and_missing_keys_are_named(raw_config):
    with pytest.raises(ConfigError, match="unknown key.*'learning-rate'"):
        RunConfig.from_mapping({**raw_config, "learning-rate": 0.1})
    del raw_config["seed"]
    with pytest.raises(ConfigError, match="missing 'seed'"):
        RunConfig.from_mapping(raw_config)


def test_fractions_must_leave_data_for_clients(raw_config):
    raw_config.update({"proxy-fraction": 0.5, "test-fraction": 0.5})
    with pytest.raises(ConfigError, match="leaves no data for the clients"):
        RunConfig.from_mapping(raw_config)


def test_distill_target_other_than_student_needs_ensemble(raw_config):
    raw_config.update({"distill": "global", "distill-target": "both"})
    with pytest.raises(ConfigError, match="'distill-target' = 'both' needs distill = 'ensemble'"):
        RunConfig.from_mapping(raw_config)
    raw_config["distill"] = "ensemble"
    assert RunConfig.from_mapping(raw_config).distill_target == "both"


def test_proximal_mu_goes_with_fedprox_only(raw_config):
    raw_config.update({"aggregation": "fedprox", "proximal-mu": 0.0})
    with pytest.raises(ConfigError, match=r"'proximal-mu' = 0 with aggregation = 'fedprox' is refused"):
        RunConfig.from_mapping(raw_config)
    raw_config.update({"aggregation": "fedavg", "proximal-mu": 0.1})
    with pytest.raises(ConfigError, match=r"'proximal-mu' = 0.1 needs aggregation = 'fedprox'.*'fedavg'"):
        RunConfig.from_mapping(raw_config)
    raw_config["aggregation"] = "fedprox"
    assert RunConfig.from_mapping(raw_config).proximal_mu == 0.1


@pytest.mark.parametrize("aggregation", ["fedavgm", "fedadam"])
def test_server_optimiser_defaults_parse(raw_config, aggregation):
    config = RunConfig.from_mapping({**raw_config, "aggregation": aggregation})
    assert (config.server_momentum, config.server_lr, config.server_tau) == (0.9, 0.01, 0.001)


def test_a_quoted_boolean_is_refused_saying_true_or_false(raw_config):
    with pytest.raises(ConfigError, match="'proxy-labelled' = 'maybe' has type str; expected bool; use true or false"):
        RunConfig.from_mapping({**raw_config, "proxy-labelled": "maybe"})


def test_example_level_dp_refuses_fedprox_whose_proximal_term_is_not_per_example(raw_config):
    raw_config.update({"dp": "example", "aggregation": "fedprox", "proximal-mu": 0.01})
    with pytest.raises(ConfigError, match="'dp' = 'example' with 'aggregation' = 'fedprox' is refused"):
        RunConfig.from_mapping(raw_config)
