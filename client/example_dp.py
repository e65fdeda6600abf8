"""Example-level differential privacy on the client: DP-SGD through Opacus (``dp = "example"``).

Each client trains with DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"):
mini-batches drawn by Poisson sampling at rate q = batch-size / n (n: this client's examples),
every example's gradient clipped to L2 norm C = ``dp-example-clipping-norm``, Gaussian noise of
std σ·C added to their sum, σ = ``dp-example-noise-multiplier``, or the σ that Opacus finds for
``dp-example-epsilon`` over the rounds this client may train (``dp-example-rounds``, 0: every one of
``num-server-rounds``) x ``local-epochs`` epochs. The library does all of it:
``opacus.PrivacyEngine.make_private`` (``opacus/privacy_engine.py``) and
``opacus.accountants.utils.get_noise_multiplier``. A client that has trained ``dp-example-rounds`` rounds
refuses to train again in this run (:func:`charge_round`): its σ was sized for no more, and the server,
which should not ask it (``server/sampling.py`` ``TrainingBudget``), is not trusted to count.

The guarantee is per example of this client's data (add or remove one example), at δ as the
server sends it (``dp-delta``; 0: 1 / the clients' pool, below 1 / n for every client). The
client reports this round's mechanism (σ, q, steps) and this round's ε(δ) from Opacus's RDP
accountant; the server composes each client's rounds (``server/privacy.py`` ``ExampleLedger``).
A FedProx proximal term is not per-example, so ``dp = "example"`` refuses ``aggregation = "fedprox"``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from flwr.app import Context, MetricRecord
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import ConfigError, RunConfig
from common.data import Dataset


def _opacus():
    try:
        import opacus
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as err:
        raise ConfigError("run config dp = 'example' needs Opacus on every client: pip install '.[dp]'") from err
    return opacus, get_noise_multiplier


BUDGET_STATE = "dp-example"  # context.state key: {"rounds": DP-SGD rounds this client trained in this run}


def charge_round(context: Context, config: RunConfig) -> int:
    """Count one more DP-SGD round against this client's budget (``context.state``, kept by the SuperNode for
    the run); returns the rounds trained with this one.

    Raises:
        ConfigError: the client has trained ``dp-example-rounds`` rounds in this run already.
    """
    trained = int(context.state[BUDGET_STATE]["rounds"]) if BUDGET_STATE in context.state else 0
    if trained >= config.example_dp_rounds:
        raise ConfigError(f"dp = 'example': this client has trained {trained} rounds of this run, all that "
                          f"dp-example-rounds = {config.dp_example_rounds} (0: num-server-rounds = "
                          f"{config.num_server_rounds}) allows; its σ was sized for no more, so it trains no more")
    context.state[BUDGET_STATE] = MetricRecord({"rounds": trained + 1})
    return trained + 1


def noise_multiplier(config: RunConfig, sample_rate: float, delta: float) -> float:
    """σ: ``dp-example-noise-multiplier``, or Opacus's σ for ``dp-example-epsilon`` at ``delta`` over the rounds
    this client may train (``RunConfig.example_dp_rounds``).

    ``sample_rate``: q, the Poisson sampling rate of one step (batch-size / n).
    """
    if config.dp_example_epsilon <= 0:
        return config.dp_example_noise_multiplier
    _, get_noise_multiplier = _opacus()
    return float(get_noise_multiplier(target_epsilon=config.dp_example_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, epochs=config.example_dp_rounds * config.local_epochs,
                                      accountant="rdp"))


def train_private(model: nn.Module, data: Dataset, config: RunConfig, device: torch.device, seed: int,
                  delta: float) -> dict[str, float]:
    """DP-SGD (momentum 0.9, lr ``lr``) for ``local-epochs`` over ``data``; trains ``model`` in place.

    Returns train loss and accuracy (over the Poisson batches drawn) and the round's mechanism:
    ``dp-noise-multiplier`` σ, ``dp-sample-rate`` q, ``dp-steps``, ``dp-epsilon`` (this round alone, at
    ``delta``, Opacus's RDP accountant). Raises ConfigError when Opacus is missing or rejects the model.
    """
    opacus, _ = _opacus()
    from opacus.validators import ModuleValidator

    model.to(device).train()
    if problems := ModuleValidator.validate(model, strict=False):
        raise ConfigError(f"dp = 'example': Opacus cannot train this model per example: {problems}")
    # Opacus draws its Poisson batches and its noise from torch's global generator: seeded, the run repeats;
    # not a cryptographic one (its secure_mode needs torchcsprng), which Opacus warns about on every round.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # images need no gradient
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=config.batch_size)
    sample_rate = 1 / len(loader)
    sigma = noise_multiplier(config, sample_rate, delta)
    engine = opacus.PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9),
        data_loader=loader, noise_multiplier=sigma, max_grad_norm=config.dp_example_clipping_norm)
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(config.local_epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = private(images)
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            steps += 1
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    private.remove_hooks()  # ``model`` holds the trained weights, without Opacus's hooks
    return {"train-loss": total_loss / max(seen, 1), "train-accuracy": correct / max(seen, 1),
            "dp-noise-multiplier": sigma, "dp-sample-rate": sample_rate, "dp-steps": steps,
            "dp-epsilon": engine.get_epsilon(delta) if sigma > 0 else float("inf")}
