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
from server.validation import OWN_DATA


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


def central_noise_problem(num_weights: int, noise_multiplier: float, clipping_norm: float, clients: int) -> str | None:
    """Why central DP cannot learn here, or None: the noise on the mean, σ·C/m per coordinate (std), has
    expected L2 norm about √d·σ·C/m over the model's d weights; above C it outweighs every clipped update
    (whose mean is at most C long). McMahan et al. 2018 (DP-FedAvg) train with thousands of users a round."""
    noise_norm = math.sqrt(num_weights) * noise_multiplier * clipping_norm / max(clients, 1)
    if noise_norm <= clipping_norm:
        return None
    needed = math.ceil(math.sqrt(num_weights) * noise_multiplier)
    return (f"central DP's noise on the mean is about sqrt(d)*sigma*C/m = {noise_norm:.3g} in L2 norm (d = {num_weights:,} "
            f"weights, noise multiplier sigma = {noise_multiplier:g}, C = {clipping_norm:g}, m = {clients} clients this "
            f"round), above the clipping norm C = {clipping_norm:g} that bounds the mean of the updates: the noise "
            f"outweighs what the clients learn. It needs m >= {needed:,} clients a round at this sigma, or a noise "
            f"multiplier <= {clients / math.sqrt(num_weights):.3g} (a larger epsilon), or dp = 'example' (DP-SGD on "
            "each client, a guarantee per example)")


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
        if not getattr(self, "_noise_checked", False):  # once, in the first round, when m is known
            self._noise_checked = True
            num_weights = sum(array.numpy().size for array in arrays.values())
            if problem := central_noise_problem(num_weights, self.noise_multiplier, self.clipping_norm,
                                                self.num_sampled_clients):
                log(WARNING, "fl-distill: %s", problem)
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
        return {"mechanism": self.mechanism, "unit": "client", "epsilon": epsilon, "delta": self.delta,
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


Mechanism = tuple[float, float, int]  # one DP-SGD round of a client: (noise multiplier σ, sample rate q, steps)


def dp_sgd_epsilon(history: list[Mechanism], delta: float) -> float:
    """ε(δ) of DP-SGD rounds composed: Opacus's RDP accountant (``opacus/accountants/rdp.py``; Mironov et al.
    2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"), the one the clients report with."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


DP_SGD_KEYS = ("dp-noise-multiplier", "dp-sample-rate", "dp-steps")


def dp_sgd_rounds(replies: Iterable[Message]) -> list[dict]:
    """The DP-SGD round each reply reports (``node-id``, the ``partition-id`` it trained, -1: its own data,
    :data:`DP_SGD_KEYS`, its ``dp-epsilon``); [] when none does.

    Every reply that is not an error counts, a rejected one included: it left its node."""
    rows = []
    for reply in replies:
        if reply.has_error():
            continue
        for record in reply.content.metric_records.values():
            if all(key in record for key in DP_SGD_KEYS):
                rows.append({"node-id": reply.metadata.src_node_id, "partition-id": int(record.get("partition-id", OWN_DATA)),
                             **{k: record[k] for k in DP_SGD_KEYS}, "dp-epsilon": record.get("dp-epsilon", math.inf)})
                break
    return rows


class ExampleLedger:
    """``dp = "example"``: each client's DP-SGD rounds (``client/example_dp.py``), composed; the worst client's ε.

    Every reply that left a node reports its round's σ, q and steps (``stats['dp-replies']``, rejected
    replies included: the server saw them); the ε of a client's data composes all its rounds in this run,
    kept by the partition it trained (two nodes on one partition release the same examples), or by node for
    a node on its own data. After a
    resume (node IDs may be new), every client is charged the worst client's rounds before it too: an
    upper bound, never an undercount. The guarantee is per example of a client's data, not per client.
    """

    mechanism = "example"

    def __init__(self, config: RunConfig, pool_size: int):
        self.delta = privacy_delta(config, pool_size)
        if config.dp_example_rounds > config.num_server_rounds:
            log(WARNING, "fl-distill: dp-example-rounds = %d is more than num-server-rounds = %d: each client sizes "
                "its noise for rounds this run does not have and spends less than its ε (more noise than needed); "
                "lower it to at most %d unless a resume will add rounds", config.dp_example_rounds,
                config.num_server_rounds, config.num_server_rounds)
        self.history: dict[str, list[Mechanism]] = {}  # "partition P" or "node N" (own data) -> its rounds
        self.before: list[Mechanism] = []  # resumed run: the worst client's rounds before the resume

    def record_round(self, stats: dict) -> dict:
        """The privacy block of this round's metrics line."""
        for reply in stats.get("dp-replies", []):
            data = (f"node {reply['node-id']}" if reply["partition-id"] == OWN_DATA
                    else f"partition {reply['partition-id']}")
            self.history.setdefault(data, []).append(
                (float(reply["dp-noise-multiplier"]), float(reply["dp-sample-rate"]), int(reply["dp-steps"])))
        worst = self._worst()
        return {"mechanism": self.mechanism, "unit": "example", "epsilon": dp_sgd_epsilon(worst, self.delta),
                "delta": self.delta, "noise-multiplier": min((m[0] for m in worst), default=0.0),
                "releases": sum(m[2] for m in worst)}

    def _worst(self) -> list[Mechanism]:
        histories = [self.before + h for h in self.history.values()] or [self.before]
        return max(histories, key=lambda h: dp_sgd_epsilon(h, self.delta))

    def state_dict(self) -> dict:
        return {"example-before": [list(m) for m in self._worst()]}

    def load_state_dict(self, state: dict) -> None:
        self.before = [(float(s), float(q), int(n)) for s, q, n in state.get("example-before", [])]


def with_privacy(aggregator: FedAvg, config: RunConfig
                 ) -> tuple[FedAvg | CentralDP, PrivacyLedger | ExampleLedger | None]:
    """The aggregation layer with ``config.dp`` applied, and the ledger that reports ε (None when dp is off)."""
    if config.dp == "off":
        return aggregator, None
    pool_size = data.pool_size(config)
    if config.dp == "local":
        return aggregator, PrivacyLedger(config, pool_size)
    if config.dp == "example":
        try:
            import opacus  # noqa: F401  (the clients train with it, the ledger composes with its accountant)
        except ImportError as err:
            raise ConfigError("run config dp = 'example' needs Opacus: pip install '.[dp]'") from err
        return aggregator, ExampleLedger(config, pool_size)
    delta = privacy_delta(config, pool_size)
    # The population bounds the number of clients (each holds >= 1 pool example); without amplification
    # it does not change ε.
    accountant = _accountant(delta, pool_size) if config.dp_noise_multiplier > 0 else None
    central = CentralDP(aggregator, config.dp_noise_multiplier, config.dp_clipping_norm, num_sampled_clients=1,
                        accountant=accountant)
    return central, PrivacyLedger(config, pool_size, central)
