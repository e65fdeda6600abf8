"""What the released models leak: membership inference against the models a run releases or the server sees.

    python -m bench.privacy_audit [--runs 4] [--rounds 3] [--clients 10] [--settings NAME ...]

Runs the shipped app in Flower's simulation engine ``--runs`` times per setting, each with its own seed,
so each run draws its own pool, proxy and test split (``common/data.py``): an example is a member of
some runs and held out of others, and which is known. Every run is in turn the target and the others
its shadows (Carlini et al. 2022's protocol, offline). Attacked per run: partition 0's client update
as the server received it (``record-updates="0"``), the global model (FedAvg's, or FedDF's fused one)
and the student. Members: partition 0's examples (the update) or the whole pool (global, student);
non-members: the run's test set, which no client and no distillation saw. A shadow's signal counts
as OUT only for examples in its test set. The attacks and the ε lower bound: ``bench/membership.py``.
Writes ``bench/results/privacy-audit/{results.json,table.md,roc.png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bench import membership
from bench.distill_benchmark import CONNECTION, simulation_superlink
from common.config import RunConfig
from common.data import SHAPES_AND_CLASSES, load_dataset, partition, split_indices
from common.models import build_model
from common.training import predict_logits
from scripts import launch

COMMON = 'proxy-fraction=0.1 test-fraction=0.6 local-epochs=1 record-updates="0" distill-steps=50 deliver="none"'
SETTINGS = {  # name -> run-config overrides
    "dp off, FedAvg": 'dp="off" distill="global"',
    "dp off, FedDF": 'dp="off" distill="ensemble" distill-target="both"',
    "central, noise 0.3": 'dp="central" dp-noise-multiplier=0.3 distill="global"',
    "central, noise 1.0": 'dp="central" dp-noise-multiplier=1.0 distill="global"',
    "local": 'dp="local" distill="global"',
    "example": 'dp="example" dp-example-epsilon=8 distill="global"',
    "example, FedDF": 'dp="example" dp-example-epsilon=8 distill="ensemble" distill-target="both"',
}
DEFAULT_SETTINGS = ["dp off, FedAvg", "dp off, FedDF", "central, noise 0.3", "example"]  # what fits in an hour here
MODELS = {"update": ("large", "update-partition-0.safetensors"), "global": ("large", "global.safetensors"),
          "student": ("small", "student.safetensors")}


def run_setting(home: Path, connection: str, overrides: str, runs: int, rounds: int, clients: int, dataset: str,
                out: Path) -> list[Path]:
    """``runs`` simulations of the app (seeds 0..runs-1); their run folders."""
    folders = []
    for seed in range(runs):
        run_id = launch.flwr_run(home, connection, f'{COMMON} {overrides} dataset="{dataset}" seed={seed} '
                                 f'num-server-rounds={rounds} out-dir="{out}"', f"num-supernodes={clients}",
                                 echo=lambda _: None)
        status = launch.wait_finished(home, connection, run_id, timeout=900)
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id} ({overrides}, seed {seed}) ended {status}")
        folders.append(out / str(run_id))
    return folders


def membership_of(config: RunConfig, clients: int, n: int) -> dict[str, np.ndarray]:
    """Boolean (n,) masks of one run: ``pool`` (trained on by some client), ``client`` (partition 0), ``test``."""
    split = split_indices(n, config.proxy_fraction, config.test_fraction, config.seed)
    labels = load_dataset(config.dataset, config.data_root, config.download).labels.numpy()
    parts = partition(labels[split.pool], clients, config.partitioning, config.dirichlet_alpha, config.seed)
    masks = {name: np.zeros(n, bool) for name in ("pool", "client", "test")}
    masks["pool"][split.pool] = True
    masks["client"][split.pool[parts[0]]] = True
    masks["test"][split.test] = True
    return masks


def audit(folders: list[Path], clients: int) -> tuple[list[dict], dict]:
    """Per model of ``MODELS`` present in every run: the attacks' figures over all targets pooled; and the
    LiRA ROC curves ({model: (fpr, tpr)}) for the figure."""
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    configs = [RunConfig.from_mapping(s["config"]) for s in summaries]
    data = load_dataset(configs[0].dataset, configs[0].data_root, configs[0].download)
    images, labels = data.images, data.labels.numpy()
    shape, classes = SHAPES_AND_CLASSES[configs[0].dataset]
    masks = [membership_of(c, clients, len(labels)) for c in configs]
    rows, curves = [], {}
    for model_name, (family, file) in MODELS.items():
        if not all((f / file).exists() for f in folders):
            continue
        logits, undefined = [], 0
        for folder in folders:
            model = build_model(family, shape, len(classes))
            model.load_state_dict(load_file(str(folder / file)))
            z, bad = membership.defined_outputs(predict_logits(model, images, torch.device("cpu")).numpy())
            logits.append(z)
            undefined += bad
        signals = np.stack([membership.lira_signal(z, labels) for z in logits])
        member_key = "client" if model_name == "update" else "pool"
        loss_scores, lira_scores, truth, accuracy = [], [], [], []
        for t, mask in enumerate(masks):
            candidates = mask[member_key] | mask["test"]
            others = [s for s in range(len(folders)) if s != t]
            shadow_in = np.stack([~masks[s]["test"] for s in others])
            lira = membership.lira_offline_scores(signals[t], signals[others], shadow_in)
            loss_scores.append(membership.loss_scores(logits[t], labels)[candidates])
            lira_scores.append(lira[candidates])
            truth.append(mask[member_key][candidates])
            accuracy.append(float((logits[t][mask["test"]].argmax(1) == labels[mask["test"]]).mean()))
        truth = np.concatenate(truth)
        privacy = summaries[0].get("privacy")
        delta = privacy["delta"] if privacy else 1.0 / max(int(masks[0]["pool"].sum()), 1)
        row = {"model": model_name, "test-accuracy": float(np.mean(accuracy)), "members": int(truth.sum()),
               "non-members": int((~truth).sum()), "targets": len(folders), "delta": delta,
               "accountant-epsilon": [s["privacy"]["epsilon"] for s in summaries] if privacy else None,
               "unit": privacy.get("unit", "client") if privacy else None,
               "undefined-outputs": undefined}  # examples x runs whose logits overflowed (read as uniform)
        for attack, scores in (("loss", np.concatenate(loss_scores)), ("lira", np.concatenate(lira_scores))):
            curve = membership.roc(scores, truth)
            row[attack] = {"auc": curve["auc"], "tpr@1%": membership.tpr_at_fpr(curve, 0.01),
                           "tpr@0.1%": (membership.tpr_at_fpr(curve, 0.001) if row["non-members"] >= 1000 else None),
                           "epsilon-lower-bound": membership.epsilon_lower_bound(scores, truth, delta)}
            if attack == "lira":
                curves[model_name] = (curve["fpr"], curve["tpr"])
        rows.append(row)
    return rows, curves


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| setting | runs | model | test acc | members / non-members | loss AUC | LiRA AUC | LiRA TPR@1% | LiRA TPR@0.1% "
             "| ε̂ lower bound (LiRA, loss) | accountant ε |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, rows in results.items():
        for r in rows:
            eps = r["accountant-epsilon"]
            accountant = (f"{np.mean(eps):.3g} ({r['unit']}-level, δ {r['delta']:.2g})" if eps else "∞ (no DP)")
            low = r["lira"]["tpr@0.1%"]
            lines.append(f"| {setting} | {r['targets']} | {r['model']} | {r['test-accuracy']:.4f} | {r['members']} / {r['non-members']} "
                         f"| {r['loss']['auc']:.3f} | {r['lira']['auc']:.3f} | {r['lira']['tpr@1%']:.4f} | "
                         f"{'-' if low is None else format(low, '.4f')} | {r['lira']['epsilon-lower-bound']:.2f}, "
                         f"{r['loss']['epsilon-lower-bound']:.2f} | {accountant} |")
    invocations = []
    for rows in results.values():
        if rows and rows[0].get("invocation") and rows[0]["invocation"] not in invocations:
            invocations.append(rows[0]["invocation"])
    lines += ["", *(f"Wall time: {', '.join(map(repr, i['settings']))}: {i['seconds']} s, one invocation." for i in invocations)]
    lines += [f"{setting!r}, {r['model']}: {r['undefined-outputs']} outputs (examples × runs) overflowed (a diverged "
              "model), read as uniform." for setting, rows in results.items() for r in rows if r.get("undefined-outputs")]
    return "\n".join(lines)


def plot(curves: dict[str, dict], path: Path) -> None:
    """Log-log ROC of offline LiRA, one panel per model, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(m in c for c in curves.values())]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, (setting, by_model) in enumerate(curves.items()):
            if model in by_model:
                fpr, tpr = by_model[model]
                ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), color=f"C{i}", label=setting)
        ax.plot([1e-5, 1], [1e-5, 1], color="grey", linestyle=":", label="chance")
        ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false positive rate",
               ylabel="true positive rate", title=f"offline LiRA: {model}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def merged(out: Path, protocol: dict, results: dict, curves: dict) -> tuple[dict, dict, list[str]]:
    """This invocation's settings over those already in ``out/results.json`` that share its ``protocol``
    (dataset, clients, rounds): a slice of settings can be audited later without losing the table's other
    rows. Returns (results, curves, settings dropped for another protocol)."""
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    kept, kept_curves, dropped = {}, {}, []
    for name, entry in saved.get("settings", {}).items():
        if name in results:
            continue
        if saved.get("protocol") != protocol:
            dropped.append(name)
            continue
        kept[name] = entry["rows"]
        kept_curves[name] = {m: (ROC_GRID, np.array(tpr)) for m, tpr in entry["curves"].items()}
    return {**kept, **results}, {**kept_curves, **curves}, dropped


ROC_GRID = np.round(np.concatenate([[0.0], np.logspace(-5, 0, 400)]), 8)  # the FPRs results.json keeps TPRs at


def thinned(fpr: np.ndarray, tpr: np.ndarray) -> list:
    """An ROC curve's TPR at each FPR of ``ROC_GRID`` (the step curve's value there), small enough for JSON."""
    index = np.searchsorted(fpr, ROC_GRID, side="right") - 1
    return np.round(tpr[np.clip(index, 0, len(tpr) - 1)], 6).tolist()


def write(out: Path, protocol: dict, results: dict, curves: dict, header: str) -> None:
    """``table.md``, ``results.json`` (rows, thinned curves, protocol) and ``roc.png`` of every setting audited
    under ``protocol`` in ``out``: this invocation's and earlier ones' (see :func:`merged`)."""
    out.mkdir(parents=True, exist_ok=True)
    results, curves, dropped = merged(out, protocol, results, curves)
    if dropped:
        print(f"dropped from the table (audited under another protocol): {', '.join(dropped)}", flush=True)
    text = f"{header}\n\n{table(results)}"
    (out / "table.md").write_text(text + "\n")
    saved = {"protocol": protocol, "settings": {
        name: {"rows": rows, "curves": {m: thinned(*curves[name][m]) for m in curves.get(name, {})}}
        for name, rows in results.items()}}
    (out / "results.json").write_text(json.dumps(saved))
    plot(curves, out / "roc.png")
    print(text, f"\nwrote {out / 'table.md'}, {out / 'roc.png'}", sep="\n", flush=True)


def main(argv: list[str] | None = None, home: Path | None = None, connection: str = CONNECTION,
         out: Path | None = None) -> int:
    """``home``/``connection``: a running simulation SuperLink to use (tests); otherwise one is started."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="federations per setting (each a target, the rest shadows)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS), metavar="NAME")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs {args.runs}: the audit needs at least 2 runs (a target and a shadow)")
    out = out or launch.REPO / "bench" / "results" / "privacy-audit"
    started = time.perf_counter()
    results, curves = {}, {}

    def audit_all(flwr_home: Path) -> None:
        for name in args.settings:
            folders = run_setting(flwr_home, connection, SETTINGS[name], args.runs, args.rounds, args.clients,
                                  args.dataset, out / "runs")
            results[name], curves[name] = audit(folders, args.clients)
            print(f"  {name}: {len(folders)} runs, {time.perf_counter() - started:.0f} s so far", flush=True)

    if home is not None:
        audit_all(home)
    else:
        with simulation_superlink(out) as flwr_home:
            audit_all(flwr_home)
    invocation = {"settings": list(results), "seconds": round(time.perf_counter() - started)}
    for rows in results.values():
        for row in rows:
            row["invocation"] = invocation  # the command that measured it: its settings and wall time
    protocol = {"dataset": args.dataset, "clients": args.clients, "rounds": args.rounds}
    write(out, protocol, results, curves, f"{args.dataset}, {args.clients} clients, {args.rounds} rounds; each "
          f"federation of a setting is the target once, the others its shadows (runs = targets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
