"""Resumable checkpoints: what a run needs to continue at the next round after the server died.

Flower 1.39 has no resume (``../shared/notes/flower-1.39-internals.md`` §4): a
SuperLink restart fails the running run, and ``Strategy.start`` always counts
from round 1. So each round the ServerApp writes ``resume.pt`` into its run
folder (after the round's ``metrics.jsonl`` line), atomically: the round number,
the config the run ran with, the global model, the student with its optimizer
and sampling-generator state, Python's RNG (node sampling) and the privacy
accountant's compositions (``dp``). A new run with
``resume-from = '<run folder>'`` loads it and goes on from the next round, in
the same folder.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.config import ConfigError, RunConfig

RESUME_FILE = "resume.pt"
# Keys a resumed run may change: how long and where it runs, not what it learns.
MAY_CHANGE = ("num-server-rounds", "min-nodes", "node-wait-timeout", "round-timeout", "fraction-evaluate",
              "out-dir", "resume-from", "device")


@dataclass
class Resumable:
    """A run's state after ``round`` rounds (see the module docstring)."""

    round: int
    config: dict
    global_model: dict[str, torch.Tensor]
    distillation: dict
    python_rng: tuple
    privacy: dict


def save(run_dir: Path, server_round: int, config: RunConfig, global_model: nn.Module, distillation: dict,
         privacy: dict | None = None) -> None:
    """Write ``run_dir/resume.pt`` for ``server_round`` (written to a temporary file, then renamed)."""
    state = {
        "round": server_round,
        "config": config.to_mapping(),
        "global_model": {k: v.detach().cpu() for k, v in global_model.state_dict().items()},
        "distillation": distillation,
        "python_rng": random.getstate(),
        "privacy": privacy or {},
    }
    tmp = run_dir / (RESUME_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / RESUME_FILE)


def load(config: RunConfig) -> Resumable:
    """The checkpoint in ``config.resume_from``, checked against ``config``.

    Raises ConfigError when the folder has no ``resume.pt``, when a key outside
    ``MAY_CHANGE`` differs from the run being resumed (naming the key, both
    values and what may change), or when ``num-server-rounds`` leaves nothing to do.
    """
    path = Path(config.resume_from) / RESUME_FILE
    if not path.is_file():
        raise ConfigError(
            f"run config 'resume-from' = {config.resume_from!r}: no {RESUME_FILE} there (looked for {path.resolve()}); "
            "name the folder of an earlier run (<out-dir>/<run-id>), relative to where the ServerApp runs, or use ''")
    state = torch.load(path, map_location="cpu", weights_only=True)
    before, now = state["config"], config.to_mapping()
    for key, value in now.items():
        if key not in MAY_CHANGE and key in before and before[key] != value:
            raise ConfigError(
                f"run config '{key}' = {value!r} differs from the run being resumed ({before[key]!r}); a resumed run "
                f"keeps its data, model and training keys: only {', '.join(MAY_CHANGE)} may change")
    if config.num_server_rounds <= state["round"]:
        raise ConfigError(
            f"run config 'num-server-rounds' = {config.num_server_rounds}: the run in {config.resume_from!r} has "
            f"already done {state['round']} rounds; set num-server-rounds to the total wanted (> {state['round']})")
    return Resumable(state["round"], before, state["global_model"], state["distillation"],
                     _as_rng_state(state["python_rng"]), state.get("privacy", {}))


def _as_rng_state(value) -> tuple:
    """``random.setstate`` wants tuples; a round trip through torch.save may hand back lists."""
    version, internal, gauss = value
    return version, tuple(internal), gauss
