"""The model families: one CNN at three widths, the ``large`` one clients train, the ``small`` one and ``tiny``.

Two 3x3 conv layers (padding 1), each followed by ReLU and 2x2 max-pool, then
two fully connected layers. For 32x32x3 input the teacher is conv 3->64,
conv 64->128, fc 128*8*8->512, fc 512->10; the student halves the conv widths
and shrinks the hidden layer to 128. ``tiny`` (conv 4, conv 8, fc 32, tanh: 13,242 weights on 28x28
digits) is sized for example-level DP (``dp = "example"``). Any (C, H, W) input and class count works.

The two widths are the model families (``common.model_families.MODEL_FAMILIES``): ``large`` is the
teacher, the model every client trains by default; ``small`` is the student's
architecture, which the server distils and which a weak device can train itself
(``model = "small"`` in its node config; ``common/model_families.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.model_families import MODEL_FAMILIES, Architecture


class ConvNet(nn.Module):
    """conv-act-pool x2, fc-act, fc (act: ReLU, or tanh where the architecture says so)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, architecture: Architecture):
        super().__init__()
        channels, height, width = input_shape
        conv1, conv2, hidden, activation = architecture
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        self.features = nn.Sequential(
            nn.Conv2d(channels, conv1, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, 3, padding=1), act(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(conv2 * (height // 4) * (width // 4), hidden), act(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(family: str, input_shape: tuple[int, int, int], num_classes: int) -> ConvNet:
    """A fresh model of ``family`` (a key of ``MODEL_FAMILIES``).

    Raises:
        ValueError: an unknown family, naming the known ones.
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"model family {family!r} is unknown; use one of {', '.join(map(repr, MODEL_FAMILIES))}")
    return ConvNet(input_shape, num_classes, MODEL_FAMILIES[family])


def build_teacher(input_shape: tuple[int, int, int], num_classes: int) -> ConvNet:
    """The model clients train and the server averages (family ``large``)."""
    return build_model("large", input_shape, num_classes)


def build_student(input_shape: tuple[int, int, int], num_classes: int) -> ConvNet:
    """The compact model the server distils for edge inference (family ``small``'s architecture)."""
    return build_model("small", input_shape, num_classes)


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    megabytes: float  # float32 weights

    def __str__(self) -> str:
        return f"{self.parameters:,} params, {self.megabytes:.2f} MB"


def model_size(model: nn.Module) -> ModelSize:
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return ModelSize(params, size / 1e6)
