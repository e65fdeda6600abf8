"""Training and evaluation loops shared by clients (local SGD) and server (test set)."""

from __future__ import annotations

import dataclasses
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
        raise ConfigError("device = 'cuda' but no CUDA device is visible here (torch.cuda.is_available() is "
                          "false: no NVIDIA GPU, driver or CUDA build of torch); use 'auto' or 'cpu'")
    return torch.device(name)


def batches(data: Dataset, batch_size: int, generator: torch.Generator | None = None):
    """(images, labels) mini-batches; shuffled when a generator is given (a CPU generator: the same order on
    every device). The batches are on ``data``'s device: index tensors follow the data there."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(data.images.device)  # one copy per pass, not per batch
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield data.images[idx], data.labels[idx]


def on_device(data: Dataset, device: torch.device) -> Dataset:
    """``data`` with its images and labels on ``device``, copied once (itself when already there).

    A client's partition here is at most a few MB (mnist-5k: 5,000 x 28 x 28 float32 = 15.7 MB for the
    whole pool), so a training task keeps it on the GPU and indexes its batches there instead of copying
    each one from host memory (``python -m bench.gpu`` measures both).
    """
    if data.images.device == device and data.labels.device == device:
        return data
    return dataclasses.replace(data, images=data.images.to(device), labels=data.labels.to(device))


def train_local(
    model: nn.Module, data: Dataset, epochs: int, batch_size: int, lr: float, device: torch.device, seed: int,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """SGD with momentum for ``epochs`` over ``data``; returns mean train loss and accuracy.

    The data goes to ``device`` once (:func:`on_device`); the loss and accuracy
    are summed there and read back once at the end, so on a GPU nothing returns
    to the host per batch (one index copy per epoch goes the other way).
    With ``proximal_mu`` = μ > 0 (FedProx, Li et al. 2020) each mini-batch loss
    gets μ/2·‖w − w_global‖², summed over all trainable parameters, where
    w_global is the model as received (a detached copy taken before training).
    The reported ``train-loss`` is the cross-entropy alone, without that term.
    """
    model.to(device).train()
    data = on_device(data, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    received = [p.detach().clone() for p in trainable] if proximal_mu > 0 else []
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(epochs):
        for images, labels in batches(data, batch_size, generator):
            optimizer.zero_grad()
            logits = model(images)
            cross_entropy = F.cross_entropy(logits, labels)
            loss = cross_entropy
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(trainable, received))
            loss.backward()
            optimizer.step()
            total_loss += cross_entropy.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
    seen = epochs * len(data)
    return {"train-loss": total_loss.item() / seen, "train-accuracy": correct.item() / seen}


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
