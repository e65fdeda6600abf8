"""Differential privacy with an accounted ε: Flower's DP wrapper and RDP accountant, and the ε of local DP.

``dp = "central"`` (McMahan et al. 2018, DP-FedAvg): every client update is
clipped to L2 norm C (``dp-clipping-norm``) and Gaussian noise of standard
deviation σ·C/m (σ = ``dp-noise-multiplier``, m = the round's sampled clients)
is added to their uniform mean, by Flower's
``DifferentialPrivacyServerSideFixedClipping`` (``flwr/serverapp/strategy/
dp_fixed_clipping.py``). Server-side clipping was chosen over client-side
(``fixedclipping_mod``): central DP trusts the server with individual updates
anyway, and a client cannot skip a clipping that happens on the server.
Everything the server derives from the noised aggregate (the student, the
checkpoints) is post-processing and costs no extra ε.

``dp = "local"``: each client clips its own update to C and adds Gaussian noise
before it leaves the node (Flower's ``LocalDpMod``, ``client/local_dp.py``), with
std 2C·sqrt(2 ln(1.25/δ))/ε_round (the classic Gaussian mechanism, Dwork & Roth
2014, Thm A.1, whose per-round bound holds for ε_round < 1; sensitivity 2C: any
two local datasets give clipped updates at most 2C apart), so the server and
FedDF's ensemble teacher only see privatised models.

ε over the rounds so far comes from Flower's RDP accountant
(``flwr.supercore.privacy_accounting``, on Google's dp-accounting) at δ =
``dp-delta`` (0: 1 / the number of examples in the clients' pool). No sampling
amplification is claimed: Flower's accounted wrapper requires
``no-amplification`` (its node sampling is not Poisson), so ε grows with the
rounds whatever ``fraction-train`` is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from common import data
from common.config import ConfigError, RunConfig


def _accountant(delta: float, population: int):
    """Flower's RDP accountant (client-level, add-or-remove-one, no amplification)."""
    try:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(PrivacyConfig(delta, max(population, 1), NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           SamplingMethod.NO_AMPLIFICATION))
    except ImportError as err:
        raise ConfigError("run config 'dp' other than 'off' needs the privacy accountant: "
                          "pip install '.[dp]' (Flower's dp extra, Google's dp-accounting)") from err


def privacy_delta(config: RunConfig, pool_size: int) -> float:
    """δ at which ε is reported: ``dp-delta``, or 1 / the number of examples in the clients' pool."""
    return config.dp_delta or 1.0 / pool_size


def local_noise_multiplier(epsilon: float, delta: float) -> float:
    """σ of local DP: LocalDpMod's std (sensitivity·sqrt(2 ln(1.25/δ))/ε) divided by the sensitivity."""
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, told each round how many clients it sampled, with uniform weights.

    The wrapper sizes its noise (σ·C/m) and its privacy event by m =
    ``num_sampled_clients``; here m is read from the Grid it is shown in
    ``configure_train`` (``server/strategy.py`` shows only the round's sampled
    nodes), so a round with fewer nodes gets the noise its mean needs. DP-FedAvg
    weights every clipped update equally (Flower's accountant requires it): the
    weight each reply carries is set to 1 before FedAvg averages them. With an
    accountant, a round where a sampled client failed or was rejected is not
    aggregated (Flower's strict check): the previous model stays, no ε is spent.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.num_sampled_clients = max(len(list(grid.get_node_ids())), 1)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key = self.weighted_by_key
        for reply in replies:
            if not reply.has_error():
                for record in reply.content.metric_records.values():
                    record[key] = 1
        return super().aggregate_train(server_round, replies)

    @property
    def weighted_by_key(self) -> str:
        return self.strategy.weighted_by_key

    @property
    def arrayrecord_key(self) -> str:
        return self.strategy.arrayrecord_key


class PrivacyLedger:
    """ε spent so far, for the metrics line, the progress line and summary.json.

    ``central``: the wrapper's accountant (one release per aggregated round).
    ``local``: per client, one release of σ = :func:`local_noise_multiplier` per
    round it trained in; the ledger reports the most-used client's ε. Across a
    resume, node IDs may change (simulation), so the releases before it are
    carried as the most any client had made: an upper bound, never an undercount.
    """

    def __init__(self, config: RunConfig, pool_size: int, central: CentralDP | None = None):
        self.mechanism = config.dp
        self.delta = privacy_delta(config, pool_size)
        self.central = central
        self.noise_multiplier = (config.dp_noise_multiplier if config.dp == "central"
                                 else local_noise_multiplier(config.dp_local_epsilon, self.delta))
        self.releases: Counter[int] = Counter()  # local: rounds each node trained in, in this run
        # local, resumed run: the most any client released before it (node IDs may be new now), an upper bound
        self.released_before = 0
        _accountant(self.delta, 1)  # fails now, with the message, if the accountant is missing
        if self.delta > 1.0 / pool_size:
            log(WARNING, "fl-distill: dp-delta = %g is more than 1 / the %d pool examples: a mechanism may then "
                "reveal an example outright with that probability; use dp-delta = 0 (1/%d) or smaller", self.delta,
                pool_size, pool_size)

    def record_round(self, stats: dict) -> dict:
        """The privacy block of this round's metrics line (``stats`` is the strategy's round stats)."""
        if self.mechanism == "local":
            self.releases.update(stats.get("heard-from", []))  # every reply that left a node was privatised
            count = self.local_releases
            epsilon = self._epsilon(count)
        else:
            count = self.central.accountant.num_releases if self.central.accountant else 0
            # Noise multiplier 0: clipping without noise, no privacy at all.
            epsilon = self.central.accountant.get_epsilon(self.delta) if self.central.accountant else math.inf
        return {"mechanism": self.mechanism, "epsilon": epsilon, "delta": self.delta,
                "noise-multiplier": self.noise_multiplier, "releases": count}

    @property
    def local_releases(self) -> int:
        """Local DP: the most releases any client has made, before a resume included."""
        return self.released_before + max(self.releases.values(), default=0)

    def _epsilon(self, count: int) -> float:
        if count == 0:
            return 0.0
        accountant = _accountant(self.delta, 1)
        accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, 1, 1), count=count)
        return accountant.get_epsilon(self.delta)

    def state_dict(self) -> dict:
        central = self.central.accountant.state_dict() if self.central and self.central.accountant else None
        return {"released-before": self.local_releases, "central": central}

    def load_state_dict(self, state: dict) -> None:
        self.released_before = int(state.get("released-before", 0))
        if state.get("central") is not None and self.central and self.central.accountant:
            self.central.accountant.load_state_dict(state["central"])


def with_privacy(aggregator: FedAvg, config: RunConfig) -> tuple[FedAvg | CentralDP, PrivacyLedger | None]:
    """The aggregation layer with ``config.dp`` applied, and the ledger that reports ε (None when dp is off)."""
    if config.dp == "off":
        return aggregator, None
    pool_size = data.pool_size(config)
    if config.dp == "local":
        return aggregator, PrivacyLedger(config, pool_size)
    delta = privacy_delta(config, pool_size)
    # The population bounds the number of clients (each holds >= 1 pool example); without amplification
    # it does not change ε.
    accountant = _accountant(delta, pool_size) if config.dp_noise_multiplier > 0 else None
    central = CentralDP(aggregator, config.dp_noise_multiplier, config.dp_clipping_norm, num_sampled_clients=1,
                        accountant=accountant)
    return central, PrivacyLedger(config, pool_size, central)
