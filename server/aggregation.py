"""The aggregation layer: which Flower strategy turns a round's client models into one.

``aggregation`` in the run config picks one of Flower's own strategies
(``flwr.serverapp.strategy``); ``server/strategy.py`` wraps it with sampling,
validation, clipping and distillation, so every choice here gets all of those.

=============== ======================================== ==========================================
``fedavg``      ``FedAvg``: Σ n_i/n · w_i                McMahan et al. 2017
``trimmed-mean`` ``FedTrimmedAvg``: per coordinate, drop Yin et al. 2018; unweighted by n_i
                the int(β·K) largest and smallest of
                the K values, average the rest
``median``      ``FedMedian``: per-coordinate median     Yin et al. 2018; unweighted by n_i
=============== ======================================== ==========================================

Sampling is done by the wrapper, so the strategy built here is asked to use every
node it is shown (fractions 1, minimums 1).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from common.config import RunConfig


def build_aggregator(config: RunConfig) -> FedAvg:
    """Flower's strategy for ``config.aggregation`` (one of ``common.config.AGGREGATIONS``)."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1)
    if config.aggregation == "fedavg":
        return FedAvg(**common)
    if config.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=config.trimmed_mean_beta, **common)
    if config.aggregation == "median":
        return FedMedian(**common)
    raise ValueError(f"aggregation {config.aggregation!r} has no strategy")  # RunConfig rejects it first
