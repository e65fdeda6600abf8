"""Shared fixtures: the default run config as pyproject.toml declares it."""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def default_run_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


@pytest.fixture
def raw_config() -> dict:
    return default_run_config()


@pytest.fixture
def config(raw_config) -> RunConfig:
    return RunConfig.from_mapping(raw_config)


@pytest.fixture
def make_strategy(config):
    """The ServerApp's strategy around the Flower aggregation named, with the default config otherwise."""
    from dataclasses import replace

    from server.aggregation import build_aggregator
    from server.strategy import DistillStrategy

    def make(aggregation: str = "fedavg", distillation=None, trimmed_mean_beta: float = 0.2, **kwargs):
        chosen = replace(config, aggregation=aggregation, trimmed_mean_beta=trimmed_mean_beta)
        return DistillStrategy(build_aggregator(chosen), distillation, **kwargs)

    return make


@pytest.fixture
def serverapp_identity():
    """Messages can only be built inside a run, as in a ServerApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """HOST:PORT of one Ray cluster (a head on this host) that the session's simulations join, instead of each
    `flwr run` starting and stopping a cluster of its own (~10 s a run on two cores); stopped at the end."""
    from scripts import launch

    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # not tmp_path: Ray's socket paths must stay short
    port = 6392  # apart from tests/test_ray_cluster.py's cluster
    log = tmp_path_factory.mktemp("ray") / "ray-head.log"
    head = launch.start_ray_node(log, temp_dir, port, head=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        launch.stop([head])
        shutil.rmtree(temp_dir, ignore_errors=True)
