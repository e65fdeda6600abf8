"""Resumable checkpoints: what a run needs to continue at the next round after the server died.

Flower 1.39 has no resume (``../shared/notes/flower-1.39-internals.md`` §4): a
SuperLink restart fails the running run, and ``Strategy.start`` always counts
from round 1. So each round the ServerApp writes ``resume.pt`` into its run
folder (after the round's ``metrics.jsonl`` line), atomically: the round number,
the config the run ran with, the global model, the student with its optimizer
and sampling-generator state, the node-sampling generator's state, the privacy
accountant's compositions (``dp``) and which node holds which partition. A new run with
``resume-from = '<run folder>'`` loads it and goes on from the next round, in
the same folder.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import ConfigError, RunConfig

RESUME_FILE = "resume.pt"
# Keys added after checkpoints were first written, with the value that behaves as before them: a checkpoint
# without the key resumes when the run keeps that value.
ADDED_SINCE = {"model-families": "large", "small-partitions": "", "record-updates": "",
               "dp-example-noise-multiplier": 1.0, "dp-example-epsilon": 0.0, "dp-example-clipping-norm": 1.0,
               "dp-example-rounds": 0,
               "fusion-check-nodes": "trained"}
# Keys a resumed run may change: how long and where it runs, not what it learns.
MAY_CHANGE = ("num-server-rounds", "min-nodes", "node-wait-timeout", "round-timeout", "fraction-evaluate",
              "out-dir", "resume-from", "device", "deliver", "deliver-every", "record-updates")


@dataclass
class Resumable:
    """A run's state after ``round`` rounds (see the module docstring)."""

    round: int
    config: dict
    global_model: dict[str, torch.Tensor]
    distillation: dict
    python_rng: tuple
    privacy: dict
    partitions: dict


def save(run_dir: Path, server_round: int, config: RunConfig, global_model: dict[str, torch.Tensor], distillation: dict,
         privacy: dict | None = None, partitions: dict | None = None, sampling_rng: tuple | None = None) -> None:
    """Write ``run_dir/resume.pt`` for ``server_round``: to a temporary file, flushed to disk, then renamed.

    ``partitions`` is the server's hand-out (``DistillStrategy.partition_state``),
    so a resumed run gives each node the data it had; ``sampling_rng`` the state of
    its node-sampling generator (``DistillStrategy.rng``), so it samples as the
    uninterrupted run would.
    """
    state = {
        "round": server_round,
        "config": config.to_mapping(),
        "global_model": {k: v.detach().cpu() for k, v in global_model.items()},
        "distillation": distillation,
        "python_rng": sampling_rng if sampling_rng is not None else random.Random().getstate(),
        "privacy": privacy or {},
        "partitions": partitions or {},
    }
    tmp = run_dir / (RESUME_FILE + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # a host crash must not leave an empty resume.pt behind the rename
    os.replace(tmp, run_dir / RESUME_FILE)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(config: RunConfig) -> Resumable:
    """The checkpoint in ``config.resume_from``, checked against ``config``.

    Raises ConfigError when the folder has no ``resume.pt``, when a key outside
    ``MAY_CHANGE`` differs from the run being resumed (naming the key, both
    values and what may change), when ``dp = "example"`` would size a client's budget for another number of
    rounds (``dp-example-rounds``, whose 0 means ``num-server-rounds``), or when ``num-server-rounds`` leaves
    nothing to do.
    """
    folder = Path(config.resume_from)
    path = folder / RESUME_FILE
    if folder.is_file():
        raise ConfigError(f"run config 'resume-from' = {config.resume_from!r} is a file; name the run's folder "
                          f"(<out-dir>/<run-id>, holding {RESUME_FILE})")
    if not path.is_file():
        raise ConfigError(
            f"run config 'resume-from' = {config.resume_from!r}: no {RESUME_FILE} there (looked for {path.resolve()}); "
            "name the folder of an earlier run (<out-dir>/<run-id>), relative to where the ServerApp runs, or use ''")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        resumable = Resumable(int(state["round"]), dict(state["config"]), dict(state["global_model"]),
                              dict(state["distillation"]), _as_rng_state(state["python_rng"]),
                              dict(state.get("privacy", {})), dict(state.get("partitions", {})))
        if resumable.round < 1:
            raise ValueError(f"round {resumable.round}")
    except Exception as err:  # any unreadable or foreign file: say which, never a traceback
        raise ConfigError(f"run config 'resume-from' = {config.resume_from!r}: {path} is not a checkpoint this "
                          f"version can resume from ({type(err).__name__}: {err}); resume from another run folder "
                          "or start a new run") from err
    before, now = resumable.config, config.to_mapping()
    for key, value in now.items():
        if key in MAY_CHANGE or key == "dp-example-rounds":  # compared as the rounds it means, below
            continue
        if key not in before and ADDED_SINCE.get(key, object()) == value:
            continue  # a key added since, at the value that behaves as the older version did
        if key not in before:
            how = (f"resume it with {key} = {ADDED_SINCE[key]!r} (how that version ran) or " if key in ADDED_SINCE
                   else "")
            raise ConfigError(f"run config '{key}' did not exist in the run being resumed (written by another "
                              f"version); {how}start a new run")
        if before[key] != value:
            raise ConfigError(
                f"run config '{key}' = {value!r} differs from the run being resumed ({before[key]!r}); a resumed run "
                f"keeps its data, model and training keys: only {', '.join(MAY_CHANGE)} may change")
    sized_for = int(before.get("dp-example-rounds", 0)) or int(before["num-server-rounds"])
    if config.dp == "example" and config.example_dp_rounds != sized_for:
        raise ConfigError(
            f"run config 'dp-example-rounds' = {config.dp_example_rounds} (num-server-rounds = "
            f"{config.num_server_rounds}): the run being resumed sized each client's DP-SGD noise and rounds for "
            f"{sized_for} rounds; sizing them anew would spend more than its ε; resume with dp-example-rounds = "
            f"{sized_for}")
    if config.num_server_rounds <= resumable.round:
        raise ConfigError(
            f"run config 'num-server-rounds' = {config.num_server_rounds}: the run in {config.resume_from!r} has "
            f"already done {resumable.round} rounds; set num-server-rounds to the total wanted (> {resumable.round})")
    return resumable


def _as_rng_state(value) -> tuple:
    """``random.setstate`` wants tuples; a round trip through torch.save may hand back lists."""
    version, internal, gauss = value
    state = (version, tuple(internal), gauss)
    random.Random().setstate(state)  # raises now on a malformed state, not later in the run
    return state
