"""Resumable checkpoints: written atomically each round, refused when the resumed run would learn differently."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from common.config import ConfigError
from server import checkpoint


def saved_run(tmp_path, config, rounds=2):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    checkpoint.save(run_dir, rounds, config, nn.Linear(3, 2), {"student": {"w": torch.ones(2)}})
    return run_dir


def test_a_checkpoint_round_trips_the_round_model_and_distillation_state(tmp_path, config):
    run_dir = saved_run(tmp_path, config)
    assert sorted(p.name for p in run_dir.iterdir()) == ["resume.pt"]  # no temporary file left behind
    state = checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=4))
    assert state.round == 2 and state.config == config.to_mapping()
    assert set(state.global_model) == {"weight", "bias"} and torch.equal(state.distillation["student"]["w"], torch.ones(2))


@pytest.mark.parametrize("key, value", [("lr", 0.5), ("dataset", "mnist"), ("seed", 7), ("distill", "off"),
                                        ("aggregation", "median")])
def test_a_resumed_run_that_would_learn_differently_is_refused_naming_the_key(tmp_path, config, key, value):
    run_dir = saved_run(tmp_path, config)
    changed = replace(config, resume_from=str(run_dir), num_server_rounds=4, **{key.replace("-", "_"): value})
    with pytest.raises(ConfigError, match=f"'{key}' = {value!r} differs from the run being resumed"):
        checkpoint.load(changed)


def test_how_long_and_where_a_run_goes_may_change_on_resume(tmp_path, config):
    run_dir = saved_run(tmp_path, config)
    checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=9, round_timeout=30.0,
                            min_nodes=5, node_wait_timeout=10.0, device="cpu"))


def test_resume_needs_rounds_left_and_a_checkpoint(tmp_path, config):
    run_dir = saved_run(tmp_path, config, rounds=4)
    with pytest.raises(ConfigError, match="already done 4 rounds; set num-server-rounds to the total wanted"):
        checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=4))
    with pytest.raises(ConfigError, match=r"'resume-from' = '.*nowhere': no resume.pt there"):
        checkpoint.load(replace(config, resume_from=str(tmp_path / "nowhere")))
