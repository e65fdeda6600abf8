"""``report.png``: one picture of a run, drawn from its ``metrics.jsonl`` rows.

Uses matplotlib's object API (``Figure``, Agg canvas), never pyplot: no GUI and
no global backend state in the ServerApp process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

NAN = float("nan")


@dataclass(frozen=True)
class RunSeries:
    """What ``plot_run`` draws. Accuracy/loss: one entry per row (None where the row lacks it).

    Time split: one entry per round >= 1, in seconds; the four parts add up to
    ``round-seconds`` unless the overhead had to be clamped at 0.
    """

    rounds: list[int]
    teacher_accuracy: list[float | None]
    teacher_loss: list[float | None]
    student_accuracy: list[float | None]
    student_loss: list[float | None]
    time_rounds: list[int]
    client_seconds: list[float]
    distill_seconds: list[float]
    server_eval_seconds: list[float]
    check_seconds: list[float]
    overhead_seconds: list[float]
    averaged_kept: list[int]  # rounds whose fuse-back kept the averaged model (``fusion.kept``)
    previous_kept: list[int]  # rounds that kept the model they started from
    families: dict[str, dict[str, list[float | None]]]  # model families but the global model's: {name: {accuracy, loss}}
    first_family: str | None  # the global model's family, in a run with several

    @property
    def has_student(self) -> bool:
        return any(v is not None for v in self.student_accuracy + self.student_loss)


def _client_seconds(row: dict) -> float:
    """Eval + train seconds of the round's slowest client, else the clients' weighted means, else 0."""
    clients = row.get("clients") or [row.get("client-metrics") or {}]
    return max(float(c.get("eval-seconds", 0.0)) + float(c.get("train-seconds", 0.0)) for c in clients)


def series(rows: list[dict]) -> RunSeries:
    """The plotted series of ``metrics.jsonl`` rows (any order, any first round, gaps allowed).

    ``check_seconds`` is the fusion check's (``fusion.seconds``), carved out of the overhead.
    """
    rows = sorted(rows, key=lambda r: r["round"])
    names = list(next((r["families"] for r in reversed(rows) if r.get("families")), {}))  # the global model's first
    pick = lambda r, model, key: (r.get(model) or {}).get(key)  # noqa: E731
    timed = [r for r in rows if r["round"] >= 1]
    client = [_client_seconds(r) for r in timed]
    distill = [float((r.get("distill") or {}).get("seconds", 0.0)) for r in timed]
    server = [float(r.get("server-eval-seconds", 0.0)) for r in timed]
    check = [float((r.get("fusion") or {}).get("seconds", 0.0)) for r in timed]
    total = [float(r.get("round-seconds", c + d + s + f))
             for r, c, d, s, f in zip(timed, client, distill, server, check)]
    return RunSeries(
        rounds=[r["round"] for r in rows],
        teacher_accuracy=[pick(r, "teacher", "accuracy") for r in rows],
        teacher_loss=[pick(r, "teacher", "loss") for r in rows],
        student_accuracy=[pick(r, "student", "accuracy") for r in rows],
        student_loss=[pick(r, "student", "loss") for r in rows],
        time_rounds=[r["round"] for r in timed],
        client_seconds=client,
        distill_seconds=distill,
        server_eval_seconds=server,
        check_seconds=check,
        overhead_seconds=[max(0.0, t - c - d - s - f) for t, c, d, s, f in zip(total, client, distill, server, check)],
        averaged_kept=[r["round"] for r in rows if (r.get("fusion") or {}).get("kept") == "averaged"],
        previous_kept=[r["round"] for r in rows if (r.get("fusion") or {}).get("kept") == "previous"],
        families={name: {key: [pick(r.get("families") or {}, name, key) for r in rows] for key in ("accuracy", "loss")}
                  for name in names[1:]},
        first_family=names[0] if names else None,
    )


def _line(ax, rounds: list[int], values: list[float | None], label: str, color: str) -> None:
    known = [v for v in values if v is not None]
    if known:
        ax.plot(rounds, [NAN if v is None else v for v in values], "o-", color=color, markersize=4,
                label=f"{label}, last {known[-1]:.4g}")


def _fusion_markers(ax, data: RunSeries) -> None:
    """On the teacher's accuracy line: × where fusion kept the averaged model, ▽ where the starting one."""
    by_round = dict(zip(data.rounds, data.teacher_accuracy))
    for rounds, marker, what in ((data.averaged_kept, "x", "the averaged model"),
                                 (data.previous_kept, "v", "the round's starting model")):
        if kept := [r for r in rounds if by_round.get(r) is not None]:
            ax.plot(kept, [by_round[r] for r in kept], marker, color="black", markersize=10, mew=2,
                    fillstyle="none", label=f"fusion kept {what} ({len(kept)} rounds)")


def _round_axis(ax, rounds: list[int]) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds and min(rounds) == max(rounds):  # one round: whole-round ticks, not ±0.045
        ax.set_xlim(rounds[0] - 1, rounds[0] + 1)


def plot_run(rows: list[dict], title: str, path: Path) -> RunSeries:
    """Write ``path`` (PNG, 1200×900 px) from ``metrics.jsonl`` rows; returns the series drawn.

    Top left, test accuracy per round (``teacher.accuracy``, ``student.accuracy``, and with several model
    families one line per family, ``families.<name>.accuracy``); top right,
    test cross-entropy loss (``teacher.loss``, ``student.loss``); bottom, each round's
    (>= 1) ``round-seconds`` as stacked bars: client training (max over ``clients`` of
    ``eval-seconds + train-seconds``, else the same keys of ``client-metrics``), distillation
    (``distill.seconds``), server evaluation (``server-eval-seconds``) and the overhead left
    (clamped at 0); with a fusion check (``fusion.seconds``) its own bar. On the accuracy panel a cross marks
    each round whose fuse-back kept the averaged model and a triangle one that kept the model it started from
    (``fusion.kept``). Missing optional keys count as
    absent / 0 seconds.
    """
    data = series(rows)
    fig = Figure(figsize=(12, 9), dpi=100, layout="constrained")
    fig.suptitle(title, fontsize=14)
    grid = fig.add_gridspec(2, 2)
    for ax, name, ylabel in ((fig.add_subplot(grid[0, 0]), "accuracy", "test accuracy"),
                             (fig.add_subplot(grid[0, 1]), "loss", "test cross-entropy loss")):
        teacher = f"family {data.first_family!r} (global model)" if data.first_family else "teacher (global model)"
        _line(ax, data.rounds, getattr(data, f"teacher_{name}"), teacher, "tab:blue")
        for (family, values), color in zip(data.families.items(), ("tab:red", "tab:brown", "tab:pink")):
            _line(ax, data.rounds, values[name], f"family {family!r}", color)
        _line(ax, data.rounds, getattr(data, f"student_{name}"), "student (distilled)", "tab:orange")
        if name == "accuracy":
            _fusion_markers(ax, data)
        ax.set(title=f"test {name} per round", ylabel=ylabel)
        _round_axis(ax, data.rounds)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    ax = fig.add_subplot(grid[1, :])
    bottom = [0.0] * len(data.time_rounds)
    for values, label, color in ((data.client_seconds, "client training + eval (slowest client)", "tab:green"),
                                 (data.distill_seconds, "distillation", "tab:orange"),
                                 (data.server_eval_seconds, "server evaluation + checkpoints", "tab:blue"),
                                 (data.check_seconds, "fusion check (clients)", "tab:purple"),
                                 (data.overhead_seconds, "overhead (waiting, transfer, aggregation)", "tab:gray")):
        if not any(values):
            continue  # e.g. no distillation: no empty legend entry
        ax.bar(data.time_rounds, values, width=0.8, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(title="where each round's time went", ylabel="seconds")
    _round_axis(ax, data.time_rounds)
    ax.grid(axis="y", alpha=0.3)
    if not data.time_rounds:
        ax.text(0.5, 0.5, "no trained rounds", ha="center", va="center", transform=ax.transAxes)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=4, frameon=False)
    fig.savefig(path)
    return data
