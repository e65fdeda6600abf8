"""The benchmark's command line: bad values stop it with one line naming them, before any run starts."""

import pytest

from bench.distill_benchmark import DEFAULT_METHODS, PARTITIONINGS, parse_args


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds = 0 is not allowed; use 1 or more"),
    (["--local-epochs", "-1"], "--local-epochs = -1 is not allowed; use 1 or more"),
    (["--fraction", "0"], "--fraction = 0.0 is not allowed; use a number > 0 and <= 1"),
    (["--target-accuracy", "5"], "--target-accuracy = 5.0 is not allowed; use a number > 0 and <= 1"),
    (["--methods", "fedavg,bogus"], "--methods: 'bogus' not known; use a subset of fedavg,"),
    (["--methods", ","], "--methods: '', '' not known"),
    (["--methods", "fedavg,feddf,fedavg"], "--methods: fedavg given more than once"),
    (["--first-seed", "-1"], "--first-seed = -1 is not allowed; use 0 or more"),
    (["--partitionings", "IID"], "--partitionings: 'IID' not known; use a subset of iid, dir1, dir0.1"),
])
def test_a_bad_argument_stops_with_one_line_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_the_defaults_are_the_whole_grid_written_where_readme_reads_it(tmp_path):
    args = parse_args([])
    assert args.methods == DEFAULT_METHODS and args.partitionings == list(PARTITIONINGS)
    assert args.out.parts[-3:] == ("bench", "results", "mnist-5k")
    assert parse_args(["--out", str(tmp_path / "slice")]).out == tmp_path / "slice"


def test_the_default_grid_leaves_out_the_unlabelled_feddf_variants():
    assert "feddf" in DEFAULT_METHODS and not [m for m in DEFAULT_METHODS if m.startswith("feddf-")]
