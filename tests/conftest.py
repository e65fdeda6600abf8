"""Shared fixtures: the default run config as pyproject.toml declares it."""

from __future__ import annotations

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
