"""The run configuration, parsed and validated once into a typed object.

Flower hands every app a flat ``run_config`` mapping (``[tool.flwr.app.config]``
plus ``--run-config`` overrides). Server and clients both call
:func:`RunConfig.from_mapping`, so a bad value stops the run at start with a
message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.model_families import MODEL_FAMILIES, FamilyError, mixing_problem, parse_families, parse_partitions

DATASETS = ("digits", "mnist-5k", "mnist", "fashion-mnist", "cifar10")
PARTITIONINGS = ("iid", "dirichlet", "shards", "sampled")
DISTILL_MODES = ("off", "global", "ensemble")
DISTILL_TARGETS = ("student", "global", "both")
DEVICES = ("auto", "cpu", "cuda")
AGGREGATIONS = ("fedavg", "fedprox", "fedavgm", "fedadam", "trimmed-mean", "median")
DP_MODES = ("off", "central", "local", "example")
DELIVERIES = ("auto", "student", "global", "both", "none")
FUSION_CHECKS = ("clients", "proxy")
FUSION_CHECK_NODES = ("idle", "trained")  # which nodes score the candidates (server/fusion_check.py)


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


def _choice(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _parses(parse: Callable[[str], Any], allowed: str) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        try:
            parse(v)
        except FamilyError as err:  # its message says which part is wrong
            raise ConfigError(f"run config {err}") from None
        return True

    return ok, allowed


def _range(lo: float, hi: float = math.inf, lo_open: bool = False):
    def ok(v: Any) -> bool:
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi

    bound = f"{'>' if lo_open else '>='} {lo}" + ("" if hi == math.inf else f" and <= {hi}")
    return ok, f"a number {bound}"


# key -> (type, (check, what is allowed)). Order = order of RunConfig fields.
_SPEC: dict[str, tuple[type, tuple[Callable[[Any], bool], str]]] = {
    "num-server-rounds": (int, _range(1)),
    "fraction-train": (float, _range(0, 1, lo_open=True)),
    "fraction-evaluate": (float, _range(0, 1)),
    "min-nodes": (int, _range(1)),
    "node-wait-timeout": (float, _range(0, lo_open=True)),
    "local-epochs": (int, _range(1)),
    "batch-size": (int, _range(1)),
    "lr": (float, _range(0, lo_open=True)),
    "dataset": (str, _choice(DATASETS)),
    "data-root": (str, ((lambda v: v != ""), "a folder path")),
    "download": (bool, ((lambda v: True), "true or false")),
    "partitioning": (str, _choice(PARTITIONINGS)),
    "dirichlet-alpha": (float, _range(0, lo_open=True)),
    "examples-per-client": (int, _range(1)),
    "num-partitions": (int, _range(0)),
    "seed": (int, _range(0, 2**63 - 1)),
    "distill": (str, _choice(DISTILL_MODES)),
    "distill-target": (str, _choice(DISTILL_TARGETS)),
    "distill-steps": (int, _range(1)),
    "distill-batch-size": (int, _range(1)),
    "distill-temperature": (float, _range(0, lo_open=True)),
    "distill-alpha": (float, _range(0, 1)),
    "distill-lr": (float, _range(0, lo_open=True)),
    "distill-anchor": (float, _range(0, 1)),
    "fusion-check": (str, _choice(FUSION_CHECKS)),
    "fusion-check-fraction": (float, _range(0, 1, lo_open=True)),
    "fusion-check-margin": (float, _range(0, 1)),
    "fusion-check-nodes": (str, _choice(FUSION_CHECK_NODES)),
    "proxy-labelled": (bool, ((lambda v: True), "true or false")),
    "proxy-fraction": (float, _range(0, 0.9, lo_open=True)),
    "test-fraction": (float, _range(0, 0.9, lo_open=True)),
    "out-dir": (str, ((lambda v: v != ""), "a folder path")),
    "round-timeout": (float, _range(0, lo_open=True)),
    "max-update-norm": (float, _range(0)),
    "max-examples-ratio": (float, ((lambda v: v == 0 or 1 <= v < math.inf), "0 (no cap) or a number >= 1")),
    "aggregation": (str, _choice(AGGREGATIONS)),
    "model-families": (str, _parses(parse_families, "a comma-separated list of " + ", ".join(
        repr(f) for f in MODEL_FAMILIES) + ", each once, the global model's first (e.g. 'large,small')")),
    "small-partitions": (str, _parses(parse_partitions, "'' (none) or partition numbers and ranges, e.g. '10-19' "
                                                        "or '0,2,4-6'")),
    "trimmed-mean-beta": (float, ((lambda v: 0 <= v < 0.5), "a number >= 0 and < 0.5")),
    "proximal-mu": (float, _range(0)),
    "server-momentum": (float, ((lambda v: 0 <= v < 1), "a number >= 0 and < 1")),
    "server-lr": (float, _range(0, lo_open=True)),
    "server-tau": (float, _range(0, lo_open=True)),
    "dp": (str, _choice(DP_MODES)),
    "dp-clipping-norm": (float, _range(0, lo_open=True)),
    "dp-noise-multiplier": (float, _range(0)),
    "dp-local-epsilon": (float, _range(0, lo_open=True)),
    "dp-delta": (float, ((lambda v: 0 <= v < 1), "a number >= 0 and < 1 (0: 1 / the number of pool examples)")),
    "dp-example-noise-multiplier": (float, _range(0, lo_open=True)),
    "dp-example-epsilon": (float, _range(0)),
    "dp-example-clipping-norm": (float, _range(0, lo_open=True)),
    "dp-example-rounds": (int, ((lambda v: v >= 0), "an integer >= 0 (0: num-server-rounds)")),
    "record-updates": (str, _parses(functools.partial(parse_partitions, key="record-updates"),
                                    "'' (none) or partition numbers and ranges whose client updates the server "
                                    "writes, e.g. '0' or '0-2'")),
    "resume-from": (str, ((lambda v: True), "'' for a new run, or the folder of the run to continue")),
    "device": (str, _choice(DEVICES)),
    "deliver": (str, _choice(DELIVERIES)),
    "deliver-every": (int, _range(0)),
}


# Node-config keys a ClientApp reads: a SuperNode's `--node-config "key=value ..."`, per machine
# (in simulation Flower sets partition-id and num-partitions). key -> (default, meaning);
# docs/configuration.md lists the same (tests/test_docs.py checks it).
NODE_CONFIG_KEYS: dict[str, tuple[str, str]] = {
    "partition-id": ("handed out by the server", "which partition of the clients' pool this node trains on"),
    "num-partitions": ("handed out by the server", "how many partitions the pool is cut into (with partition-id)"),
    "data-dir": ("none", "a folder of the node's own images (ImageFolder layout) instead of a partition"),
    "device": ("the run config's device", "auto, cpu or cuda for this node only"),
    "model-dir": ("models", "where delivered models are installed, relative to the SuperNode's directory"),
    "model": ("the run's assignment", "the model family this node trains: " + ", ".join(MODEL_FAMILIES)),
}


def _folder(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and not Path(value).expanduser().is_file()


# What each node-config key allows (checked where the app runs: the ClientApp, and
# fl-distill-supernode before it starts).
_NODE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "partition-id": ((lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0), "an integer >= 0"),
    "num-partitions": ((lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1), "an integer >= 1"),
    "data-dir": (_folder, "a quoted folder path, e.g. data-dir=\"/srv/images\""),
    "device": ((lambda v: v in DEVICES), "one of " + ", ".join(repr(d) for d in DEVICES)),
    "model-dir": (_folder, "a quoted folder path that is not a file, e.g. model-dir=\"models\""),
    "model": ((lambda v: v in MODEL_FAMILIES), "one of " + ", ".join(repr(f) for f in MODEL_FAMILIES)),
}


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """Refuse a node-config key no part of the app reads (a typo would otherwise be a silent default),
    and a value its key does not allow.

    Raises:
        ConfigError: naming the unknown key(s) and the known ones, or the key, its value and what is allowed.
    """
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"node config has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(NODE_CONFIG_KEYS)}"
        )
    for key, value in node_config.items():
        ok, allowed = _NODE_CHECKS[key]
        if not ok(value):
            raise ConfigError(f"node config '{key}' = {value!r} is not allowed; use {allowed}")
    if {"partition-id", "num-partitions"} <= set(node_config) and \
            node_config["partition-id"] >= node_config["num-partitions"]:
        raise ConfigError(f"node config partition-id = {node_config['partition-id']} must be below "
                          f"num-partitions = {node_config['num-partitions']}")
    if ("partition-id" in node_config) != ("num-partitions" in node_config):
        given, missing = ("partition-id", "num-partitions") if "partition-id" in node_config else \
            ("num-partitions", "partition-id")
        raise ConfigError(f"node config has {given} but not {missing}; give both, or neither "
                          "(then the server hands out partitions)")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Accept what TOML and ``--run-config`` produce; reject anything else."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    allowed = "; use true or false (no quotes)" if kind is bool else ""
    raise ConfigError(
        f"run config '{key}' = {value!r} has type {type(value).__name__}; "
        f"expected {kind.__name__}{allowed}"
    )


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run; attribute names are the keys with '_' for '-'."""

    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    node_wait_timeout: float
    local_epochs: int
    batch_size: int
    lr: float
    dataset: str
    data_root: str
    download: bool
    partitioning: str
    dirichlet_alpha: float
    examples_per_client: int
    num_partitions: int
    seed: int
    distill: str
    distill_target: str
    distill_steps: int
    distill_batch_size: int
    distill_temperature: float
    distill_alpha: float
    distill_lr: float
    distill_anchor: float
    fusion_check: str
    fusion_check_fraction: float
    fusion_check_margin: float
    fusion_check_nodes: str
    proxy_labelled: bool
    proxy_fraction: float
    test_fraction: float
    out_dir: str
    round_timeout: float
    max_update_norm: float
    max_examples_ratio: float
    aggregation: str
    model_families: str
    small_partitions: str
    trimmed_mean_beta: float
    proximal_mu: float
    server_momentum: float
    server_lr: float
    server_tau: float
    dp: str
    dp_clipping_norm: float
    dp_noise_multiplier: float
    dp_local_epsilon: float
    dp_delta: float
    dp_example_noise_multiplier: float
    dp_example_epsilon: float
    dp_example_clipping_norm: float
    dp_example_rounds: int
    record_updates: str
    resume_from: str
    device: str
    deliver: str
    deliver_every: int

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Validate ``raw`` (a Flower run config) and build the typed config."""
        unknown = sorted(set(raw) - set(_SPEC))
        if unknown:
            raise ConfigError(
                f"run config has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(_SPEC)}"
            )
        values = {}
        for key, (kind, (ok, allowed)) in _SPEC.items():
            if key not in raw:
                raise ConfigError(f"run config is missing '{key}' ({allowed})")
            value = _coerce(key, raw[key], kind)
            if not ok(value):
                raise ConfigError(f"run config '{key}' = {value!r} is not allowed; use {allowed}")
            values[key.replace("-", "_")] = value
        config = cls(**values)
        if config.proxy_fraction + config.test_fraction >= 1.0:
            raise ConfigError(
                f"run config 'proxy-fraction' + 'test-fraction' = "
                f"{config.proxy_fraction + config.test_fraction:g} leaves no data for "
                "the clients; their sum must be < 1"
            )
        if config.distill != "ensemble" and config.distill_target != "student":
            raise ConfigError(
                f"run config 'distill-target' = {config.distill_target!r} needs distill = 'ensemble' "
                f"(distill = {config.distill!r} can only train the 'student')"
            )
        if config.dp == "central" and config.distill == "ensemble":
            raise ConfigError(
                "run config 'dp' = 'central' with 'distill' = 'ensemble' is refused: the ensemble teacher reads each "
                "client's own model, which central DP (noise on the aggregate only) does not protect; use "
                "dp = 'local' (clients noise their own updates) or distill = 'global' (the noised aggregate teaches)")
        if config.dp == "central" and config.aggregation not in ("fedavg", "fedprox"):
            raise ConfigError(
                f"run config 'dp' = 'central' with 'aggregation' = {config.aggregation!r} is refused: central DP's "
                "noise (noise multiplier x clipping norm / clients) is calibrated for the mean of clipped updates; "
                "use aggregation = 'fedavg' (or 'fedprox', whose server side is FedAvg), or dp = 'local', which works "
                "with every aggregation")
        if config.deliver in ("student", "both") and not config.trains_student:
            raise ConfigError(
                f"run config 'deliver' = {config.deliver!r} needs a student, and distill = {config.distill!r} with "
                f"distill-target = {config.distill_target!r} trains none; use deliver = 'global' (or 'auto'), or "
                "distill-target = 'both'")
        if config.dp == "example" and config.aggregation == "fedprox":
            raise ConfigError(
                "run config 'dp' = 'example' with 'aggregation' = 'fedprox' is refused: DP-SGD clips and noises "
                "each example's gradient, and FedProx's proximal term is not per example (Opacus would drop it); "
                "use aggregation = 'fedavg' or another one")
        if config.aggregation == "fedprox" and config.proximal_mu == 0:
            raise ConfigError(
                "run config 'proximal-mu' = 0 with aggregation = 'fedprox' is refused: without the proximal term "
                "FedProx is FedAvg; set proximal-mu > 0 (Li et al. 2020 try 0.001 to 1), or use aggregation = 'fedavg'")
        if config.proximal_mu > 0 and config.aggregation != "fedprox":
            raise ConfigError(
                f"run config 'proximal-mu' = {config.proximal_mu:g} needs aggregation = 'fedprox' "
                f"(aggregation = {config.aggregation!r} sends no proximal term to the clients)")
        if problem := mixing_problem(config):
            raise ConfigError(f"run config {problem}")
        return config

    @property
    def families(self) -> tuple[str, ...]:
        """``model-families`` parsed: the run's model families, the global model's first."""
        return parse_families(self.model_families)

    @property
    def example_dp_rounds(self) -> int:
        """The rounds one client's ``dp = 'example'`` budget covers: ``dp-example-rounds``, 0 = every round."""
        return self.dp_example_rounds or self.num_server_rounds

    @property
    def trains_student(self) -> bool:
        """Whether the server distils a student (every mode but 'off', unless it fuses into the global model only)."""
        return self.distill != "off" and self.distill_target in ("student", "both")

    def to_mapping(self) -> dict[str, Any]:
        """The config as Flower run-config keys (for summaries and messages)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
