"""The aggregation layer: which Flower strategy turns a round's client models into one.

``aggregation`` in the run config picks one of Flower's own strategies
(``flwr.serverapp.strategy``); ``server/strategy.py`` wraps it with sampling,
validation, clipping and distillation, so every choice here gets all of those.
w is the global model the round sent, w_i the K client models, n_i their
``num-examples``, n = Σ n_i, t the round.

================ ============================================= ==========================================
``fedavg``       ``FedAvg``: Σ n_i/n · w_i                     McMahan et al. 2017
``fedprox``      ``FedProx``: as fedavg on the server; each    Li et al. 2020; ``proximal-mu`` = μ
                 client minimises its loss + μ/2·‖w_i − w‖²    (sent in the train config)
``fedavgm``      ``FedAvgM``: Δ = w − Σ n_i/n·w_i,             Hsu et al. 2019; ``server-momentum`` = β,
                 v ← β·v + Δ, w ← w − v                        server learning rate 1
``fedadam``      ``FedAdam``: Δ = Σ n_i/n·w_i − w,             Reddi et al. 2021; ``server-lr`` = η,
                 m ← β1·m + (1−β1)·Δ, v ← β2·v + (1−β2)·Δ²,    ``server-tau`` = τ, β1 = 0.9, β2 = 0.99
                 w ← w + η_t·m/(√v + τ),                       (Flower's defaults)
                 η_t = η·√(1−β2^(t+1))/(1−β1^(t+1))
``trimmed-mean`` ``FedTrimmedAvg``: per coordinate, drop       Yin et al. 2018; unweighted by n_i
                 the int(β·K) largest and smallest of
                 the K values, average the rest
``median``       ``FedMedian``: per-coordinate median          Yin et al. 2018; unweighted by n_i
================ ============================================= ==========================================

η_t is Flower's bias correction (``flwr/serverapp/strategy/fedadam.py``,
``eta_norm``, with exponent t + 1); the paper has none. FedAdam's ``eta_l`` is
only logged by Flower (``fedopt.py``), never sent: clients train with ``lr``,
which is what is passed so the log tells the truth.

Two changes to Flower 1.39 (tested in ``tests/test_aggregation.py``):

* FedAvgM keeps its own copy of the global model (set in its first
  ``configure_train`` only, then replaced by its own result in
  ``aggregate_train``, ``fedavgm.py``) and takes the next step from that copy.
  With ``distill-target`` = 'global' / 'both' the model that goes out is the
  distilled one, so that fine-tuning would be silently undone;
  :class:`FedAvgMFromSent` steps from the model each round actually sent, as
  Flower's FedOpt strategies already do (``fedopt.py`` ``configure_train``).
* FedAdam's step multiplies by a NumPy float64 (η_t), so with NumPy 2 it returns
  float64 arrays from a float32 model; the clients' float32 replies would then
  be rejected by validation (wrong dtype) from round 2 on.
  :class:`FedAdamSameDtype` casts the result back to the sent model's dtypes.

The server optimisers' state (FedAvgM's v, FedAdam's m and v) lives in memory: a
resumed run (``resume-from``) starts them from zero.

Sampling is done by the wrapper, so the strategy built here is asked to use every
node it is shown (fractions 1, minimums 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg

from common.config import RunConfig


class FedAvgMFromSent(FedAvgM):
    """Flower's FedAvgM, its server step taken from the model this round sent, not from its own last result."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays  # Flower sets it only when None (fedavgm.py, configure_train)
        return super().configure_train(server_round, arrays, config, grid)


class FedAdamSameDtype(FedAdam):
    """Flower's FedAdam, its new model in the dtypes of the model sent (Flower's step upcasts to float64)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=self.current_arrays[k].dtype))
                            for k, a in arrays.items()}), metrics


def build_aggregator(config: RunConfig) -> FedAvg:
    """Flower's strategy for ``config.aggregation`` (one of ``common.config.AGGREGATIONS``)."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1)
    if config.aggregation == "fedavg":
        return FedAvg(**common)
    if config.aggregation == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.aggregation == "fedavgm":
        return FedAvgMFromSent(server_learning_rate=1.0, server_momentum=config.server_momentum, **common)
    if config.aggregation == "fedadam":
        return FedAdamSameDtype(eta=config.server_lr, eta_l=config.lr, tau=config.server_tau, **common)
    if config.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=config.trimmed_mean_beta, **common)
    if config.aggregation == "median":
        return FedMedian(**common)
    raise ValueError(f"aggregation {config.aggregation!r} has no strategy")  # RunConfig rejects it first
