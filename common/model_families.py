"""Which model family each node trains, and one record that carries every family's global model.

A federation may mix model families (``MODEL_FAMILIES``: ``large``, today's CNN, ``small``, the
compact one, and ``tiny``, sized for example-level DP): each family is averaged among its own clients and FedDF's
distillation fuses knowledge across them (Lin et al. 2020, Sec. 4.3; ``server/families.py``). Which
family a node trains, in this order:

1. its node config's ``model`` (a weak edge device: ``model="small"``);
2. ``small`` when its partition is in the run config's ``small-partitions`` (simulation, compose);
3. else the run's first family, the first of ``model-families`` (``large`` by default).

Flower's strategy loop carries one ArrayRecord from round to round; with more than one family it is
every family's model packed into one record, array ``<family>/<name>`` (:func:`pack`). A run with a
single family carries that family's model unchanged, so its files are those of a run before families.
"""

from __future__ import annotations

from typing import NamedTuple

from flwr.app import ArrayRecord

class Architecture(NamedTuple):
    """A family's CNN (``common/models.py`` builds it): its (conv, conv, hidden) widths and activation."""

    conv1: int
    conv2: int
    hidden: int
    activation: str = "relu"  # or "tanh", a tempered sigmoid: it learns better under DP-SGD (Papernot et al. 2021)


# The families by name. Kept here, not beside the torch code, so that what only checks a family's name (the
# run and node config, a SuperNode process) does not import torch: ~475 MB a process. ``tiny`` is sized for
# dp = "example": DP-SGD's noise grows with the weights' count d and the signal with a client's examples n,
# so it learns when n / sqrt(d) is not small (13k weights on 28x28 digits; docs/privacy.md).
MODEL_FAMILIES = {"large": Architecture(64, 128, 512), "small": Architecture(32, 64, 128),
                  "tiny": Architecture(4, 8, 32, "tanh")}

SEPARATOR = "/"


class FamilyError(ValueError):
    """A family name, a list of families or a partition list is not allowed."""


def parse_families(spec: str) -> tuple[str, ...]:
    """``"large,small"`` -> ('large', 'small'): the run's families, the first one the global model's.

    Raises:
        FamilyError: empty, an unknown name or one named twice, saying what is allowed.
    """
    names = tuple(name.strip() for name in spec.split(","))
    allowed = f"a comma-separated list of {', '.join(map(repr, MODEL_FAMILIES))}, each once, e.g. 'large,small'"
    if not spec.strip() or any(name not in MODEL_FAMILIES for name in names) or len(set(names)) != len(names):
        raise FamilyError(f"'model-families' = {spec!r} is not allowed; use {allowed}")
    return names


def parse_partitions(spec: str, key: str = "small-partitions") -> frozenset[int]:
    """``"0-4,7"`` -> {0, 1, 2, 3, 4, 7}; ``""`` -> none. ``key``: the run-config key the error names.

    Raises:
        FamilyError: anything but comma-separated whole numbers >= 0 and ranges ``a-b`` with a <= b.
    """
    partitions: set[int] = set()
    for part in (p.strip() for p in spec.split(",") if spec.strip()):
        low, dash, high = part.partition("-")
        if not (low.isdigit() and (high.isdigit() or not dash)) or (high and int(high) < int(low)):
            raise FamilyError(f"'{key}' = {spec!r} is not allowed: {part!r} is neither a partition "
                              "number >= 0 nor a range a-b with a <= b; use e.g. '10-19' or '0,2,4-6', or '' for none")
        partitions.update(range(int(low), int(high or low) + 1))
    return frozenset(partitions)


def family_of(declared: str | None, partition: int | None, families: tuple[str, ...],
              small_partitions: frozenset[int]) -> str:
    """The family a node trains: ``declared`` (its node config's ``model``), else by ``partition`` (see above)."""
    if declared:
        return declared
    if partition is not None and partition in small_partitions:
        return "small"
    return families[0]


def pack(models: dict[str, ArrayRecord]) -> ArrayRecord:
    """One record for ``models`` ({family: its global model}); a single family's model as it is."""
    if len(models) == 1:
        return next(iter(models.values()))
    return ArrayRecord({f"{family}{SEPARATOR}{name}": array for family, record in models.items()
                        for name, array in record.items()})


def unpack(record: ArrayRecord, families: tuple[str, ...]) -> dict[str, ArrayRecord]:
    """{family: model} from :func:`pack`'s record, in ``families``' order.

    Raises:
        FamilyError: the record lacks a family's arrays (e.g. a checkpoint of a run with other families).
    """
    if len(families) == 1:
        return {families[0]: record}
    models: dict[str, dict] = {family: {} for family in families}
    for key, array in record.items():
        family, _, name = key.partition(SEPARATOR)
        if family in models:
            models[family][name] = array
    if missing := [family for family, arrays in models.items() if not arrays]:
        raise FamilyError(f"the model record has no arrays of the family(ies) {missing}; it holds "
                          f"{sorted({key.partition(SEPARATOR)[0] for key in record})}")
    return {family: ArrayRecord(arrays) for family, arrays in models.items()}


def mixing_problem(config) -> str | None:
    """Why ``config`` (a :class:`common.config.RunConfig`) cannot run its families, or None when it can.

    Refused with more than one family: ``dp = 'central'`` (its noise is calibrated to one mean of clipped
    updates; families are separate means, each over fewer clients). ``small-partitions`` needs
    ``small`` among the families and, with ``num-partitions`` set, partitions below it.
    """
    families, small = parse_families(config.model_families), parse_partitions(config.small_partitions)
    if small and "small" not in families:
        return (f"'small-partitions' = {config.small_partitions!r} needs 'small' in 'model-families' "
                f"(= {config.model_families!r}); add it, e.g. model-families = 'large,small'")
    if small and config.num_partitions and max(small) >= config.num_partitions:
        return (f"'small-partitions' = {config.small_partitions!r} names partition {max(small)}, but "
                f"num-partitions = {config.num_partitions} has partitions 0 to {config.num_partitions - 1}")
    if len(families) > 1 and config.dp == "central":
        return (f"'dp' = 'central' with model-families = {config.model_families!r} is refused: central DP's noise "
                "is calibrated to one mean of clipped updates, and each family is a mean of its own, over fewer "
                "clients; use dp = 'local' (each client noises its own update, in any family) or one family")
    return None
