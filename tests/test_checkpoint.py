"""Resumable checkpoints: written atomically each round, refused when the resumed run would learn differently."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn

from common.config import ConfigError
from server import checkpoint
from tests.fakes import FakeGrid


def saved_run(tmp_path, config, rounds=2):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    checkpoint.save(run_dir, rounds, config, nn.Linear(3, 2).state_dict(), {"student": {"w": torch.ones(2)}})
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


def test_an_example_dp_run_resumes_only_with_each_clients_budget_sized_for_the_same_rounds(tmp_path, config):
    """dp-example-rounds = 0 means num-server-rounds: more rounds on resume would size σ anew, past the ε target."""
    private = replace(config, dp="example", dp_example_epsilon=8.0, dp_example_rounds=0, num_server_rounds=5)
    run_dir = saved_run(tmp_path, private)
    with pytest.raises(ConfigError, match="sized each client's DP-SGD noise and rounds for 5 rounds; .* "
                                          "resume with dp-example-rounds = 5"):
        checkpoint.load(replace(private, resume_from=str(run_dir), num_server_rounds=8))
    checkpoint.load(replace(private, resume_from=str(run_dir), num_server_rounds=8, dp_example_rounds=5))
    with pytest.raises(ConfigError, match="resume with dp-example-rounds = 5"):
        checkpoint.load(replace(private, resume_from=str(run_dir), num_server_rounds=8, dp_example_rounds=3))
    (tmp_path / "off").mkdir()
    off = saved_run(tmp_path / "off", config)
    checkpoint.load(replace(config, resume_from=str(off), num_server_rounds=8, dp_example_rounds=3))  # unused: dp off


def test_resume_needs_rounds_left_and_a_checkpoint(tmp_path, config):
    run_dir = saved_run(tmp_path, config, rounds=4)
    with pytest.raises(ConfigError, match="already done 4 rounds; set num-server-rounds to the total wanted"):
        checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=4))
    with pytest.raises(ConfigError, match=r"'resume-from' = '.*nowhere': no resume.pt there"):
        checkpoint.load(replace(config, resume_from=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_an_unreadable_checkpoint_is_a_clear_error_naming_the_file(tmp_path, config, content):
    run_dir = saved_run(tmp_path, config)
    (run_dir / "resume.pt").write_bytes(content)
    with pytest.raises(ConfigError, match=r"resume\.pt is not a checkpoint this version can resume from"):
        checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=4))


def test_a_checkpoint_written_without_a_key_this_version_knows_is_refused(tmp_path, config):
    run_dir = saved_run(tmp_path, config)
    state = torch.load(run_dir / "resume.pt", weights_only=True)
    del state["config"]["aggregation"]
    torch.save(state, run_dir / "resume.pt")
    with pytest.raises(ConfigError, match="'aggregation' did not exist in the run being resumed"):
        checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=4))


def test_resume_from_a_file_says_to_name_the_folder(tmp_path, config):
    run_dir = saved_run(tmp_path, config)
    with pytest.raises(ConfigError, match="is a file; name the run's folder"):
        checkpoint.load(replace(config, resume_from=str(run_dir / "resume.pt"), num_server_rounds=4))


def test_the_partition_hand_out_survives_a_resume(tmp_path, config, make_strategy):
    strategy = make_strategy()
    strategy.partition_of, strategy.num_partitions = {907: 2, 12: 0, 455: 1}, 3
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint.save(run_dir, 2, config, nn.Linear(3, 2).state_dict(), {}, {}, strategy.partition_state())
    resumed = make_strategy()
    resumed.load_partition_state(checkpoint.load(replace(config, resume_from=str(run_dir),
                                                         num_server_rounds=4)).partitions)
    assert resumed.partition_of == {907: 2, 12: 0, 455: 1} and resumed.num_partitions == 3


@pytest.mark.usefixtures("serverapp_identity")
def test_a_resumed_run_samples_the_nodes_the_uninterrupted_run_would(tmp_path, config, make_strategy):
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    grid = FakeGrid(list(range(1, 21)))

    def sampled(strategy, server_round):
        return sorted(m.metadata.dst_node_id for m in strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))

    uninterrupted = make_strategy(fraction_train=0.2, sampling_seed=3)
    expected = [sampled(uninterrupted, r) for r in (1, 2, 3, 4)]
    first = make_strategy(fraction_train=0.2, sampling_seed=3)
    assert [sampled(first, r) for r in (1, 2)] == expected[:2]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint.save(run_dir, 2, config, nn.Linear(3, 2).state_dict(), {}, {}, first.partition_state(), first.rng.getstate())
    resumable = checkpoint.load(replace(config, resume_from=str(run_dir), num_server_rounds=4))
    resumed = make_strategy(fraction_train=0.2, sampling_seed=3)
    resumed.load_partition_state(resumable.partitions)
    resumed.rng.setstate(resumable.python_rng)
    assert [sampled(resumed, r) for r in (3, 4)] == expected[2:]


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, config):
    from server.reporting import RunReport

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"round": 3, "teach')
    report = RunReport(config, run_dir, test_set=None, device=torch.device("cpu"), resume_after=2)
    assert [r["round"] for r in report.rows] == [0, 1, 2]
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 0}\n{"round": 1}\n{"round": 2}\n'


def test_a_checkpoint_from_before_the_newer_keys_resumes_at_their_defaults(tmp_path, config):
    import dataclasses

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint.save(run_dir, 1, config, nn.Linear(3, 2).state_dict(), {})
    state = torch.load(run_dir / checkpoint.RESUME_FILE, weights_only=False)
    for key in checkpoint.ADDED_SINCE:
        del state["config"][key]  # written by the version before model families, example DP and record-updates
    torch.save(state, run_dir / checkpoint.RESUME_FILE)
    later = dataclasses.replace(config, resume_from=str(run_dir), num_server_rounds=3)
    # that version's clients checked the fusion themselves: the new default ('idle') would change the run
    with pytest.raises(ConfigError, match="resume it with fusion-check-nodes = 'trained' .how that version ran."):
        checkpoint.load(later)
    later = dataclasses.replace(later, fusion_check_nodes="trained")
    assert checkpoint.load(later).round == 1
    with pytest.raises(ConfigError, match="'model-families' did not exist in the run being resumed"):
        checkpoint.load(dataclasses.replace(later, model_families="large,small"))
