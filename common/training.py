"""Training and evaluation loops shared by clients (local SGD) and server (test set)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.data import Dataset


CPU_THREADS_ENV = "FL_DISTILL_CPU_THREADS"


def setup_compute(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU; asking for cuda without one is an error.

    Also caps torch's CPU threads (``FL_DISTILL_CPU_THREADS``, default 1): these
    models are small, and several Flower processes sharing a host's cores with
    one thread pool each slow down many-fold when oversubscribed.
    """
    threads = os.environ.get(CPU_THREADS_ENV, "1")
    if not threads.isdigit() or int(threads) < 1:
        raise ConfigError(f"environment {CPU_THREADS_ENV} = {threads!r} is not allowed; use a whole number >= 1")
    torch.set_num_threads(int(threads))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available here; use 'auto' or 'cpu'")
    return torch.device(name)


def batches(data: Dataset, batch_size: int, generator: torch.Generator | None = None):
    """(images, labels) mini-batches; shuffled when a generator is given."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield data.images[idx], data.labels[idx]


def train_local(
    model: nn.Module, data: Dataset, epochs: int, batch_size: int, lr: float, device: torch.device, seed: int,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """SGD with momentum for ``epochs`` over ``data``; returns mean train loss and accuracy.

    With ``proximal_mu`` = μ > 0 (FedProx, Li et al. 2020) each mini-batch loss
    gets μ/2·‖w − w_global‖², summed over all trainable parameters, where
    w_global is the model as received (a detached copy taken before training).
    The reported ``train-loss`` is the cross-entropy alone, without that term.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    received = [p.detach().clone() for p in trainable] if proximal_mu > 0 else []
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for images, labels in batches(data, batch_size, generator):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = model(images)
            cross_entropy = F.cross_entropy(logits, labels)
            loss = cross_entropy
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(trainable, received))
            loss.backward()
            optimizer.step()
            total_loss += cross_entropy.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return {"train-loss": total_loss / seen, "train-accuracy": correct / seen}


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Logits for all ``images``, on the CPU."""
    model.to(device).eval()
    return torch.cat([model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def evaluate(model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float]:
    """Cross-entropy loss and accuracy on ``data``."""
    logits = predict_logits(model, data.images, device)
    return {
        "loss": F.cross_entropy(logits, data.labels).item(),
        "accuracy": (logits.argmax(1) == data.labels).float().mean().item(),
    }
