"""Simulate a run on this host: a SuperLink in simulation mode, `flwr run`, status check.

    python -m scripts.simulate [--clients N] [--run-config "k=v ..."] [--ray-address HOST:PORT]
                               [--client-gpus SHARE]

With ``--client-gpus 0.25`` each virtual client reserves a quarter of a GPU from Ray, so four share one
(docs/gpu.md); ``device="cuda"`` in the run config where no CUDA device is visible is refused here, and so is
``--client-gpus`` unless ``--ray-address`` runs the clients on a cluster's GPUs.

With ``--ray-address`` (or ``RAY_ADDRESS`` set) the virtual clients run on that existing Ray
cluster (``ray start --head`` on one machine, ``ray start --address`` on the others): Flower's
Ray backend calls ``ray.init()``, which joins the cluster ``RAY_ADDRESS`` names, and places one
ClientApp actor per ``client-resources-num-cpus`` free CPUs of every node (docs/scale.md).
The SuperLink is started for this run and stopped afterwards, so nothing is
left listening. Exits non-zero unless Flower reports the run
'finished:completed' (`flwr run` itself exits 0 even when a run fails).
"""

from __future__ import annotations

import argparse
import os
import sys

from flwr.common.config import get_project_config, parse_config_args

from common.config import ConfigError, RunConfig
from scripts import launch

CONNECTION = "fl-distill-sim"


def run_config(overrides: str) -> RunConfig:
    """The run config this app would run with: pyproject.toml's defaults plus ``--run-config`` overrides,
    checked here so that a bad value is refused before any Flower process starts."""
    defaults = get_project_config(launch.REPO)["tool"]["flwr"]["app"]["config"]
    try:
        parsed = parse_config_args([overrides]) if overrides else {}
    except Exception as err:  # Flower's own message says what the format is
        raise ConfigError(f"--run-config {overrides!r}: {getattr(err, 'message', err)}") from None
    return RunConfig.from_mapping({**defaults, **parsed})


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    """The command line and the run config it asks for; exits 2 with a message on a bad value."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="virtual clients (SuperNodes), default 10")
    parser.add_argument("--run-config", default="", help='overrides of [tool.flwr.app.config], e.g. "num-server-rounds=3"')
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", ""),
                        help="an existing Ray cluster's head, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else a "
                             "one-host Ray instance started for the run)")
    parser.add_argument("--client-gpus", type=float, default=0.0,
                        help="the share of a GPU each virtual client reserves (Ray's num_gpus), e.g. 0.25: four "
                             "clients train on one GPU at a time; 0 (default): none, clients run on the CPU")
    parser.add_argument("--flwr-home", default=str(launch.REPO / ".flwr"), help="Flower home (state, logs)")
    args = parser.parse_args(argv)
    if args.ray_address and (":" not in args.ray_address or not args.ray_address.rsplit(":", 1)[1].isdigit()):
        parser.error(f"--ray-address = {args.ray_address!r} is not allowed; use the head's HOST:PORT, as "
                     "`ray start --head` prints it (e.g. 10.0.0.5:6379)")
    if args.clients < 1:
        parser.error(f"--clients = {args.clients} is not allowed; use 1 or more")
    if not 0 <= args.client_gpus <= 1:
        parser.error(f"--client-gpus = {args.client_gpus} is not allowed; use a share of one GPU, 0 to 1")
    try:
        config = run_config(args.run_config)
    except ConfigError as err:
        parser.error(str(err))
    # The ServerApp runs on this host, and the clients too unless --ray-address puts them on a cluster
    # (whose GPUs Ray counts, not this host's): check here what runs here.
    if config.device == "cuda" or (args.client_gpus > 0 and not args.ray_address):
        from common.training import setup_compute  # imports torch: only when a GPU is asked for

        try:
            setup_compute("cuda")
        except ConfigError as err:
            parser.error(f"run config {err}" if config.device == "cuda" else
                         f"--client-gpus = {args.client_gpus} needs a GPU, but no CUDA device is visible here; "
                         "drop --client-gpus")
    if args.client_gpus > 0 and config.device == "cpu":
        parser.error(f"--client-gpus = {args.client_gpus} with run config device = 'cpu' would reserve GPUs that "
                     "no client uses; use device=\"auto\" or \"cuda\", or drop --client-gpus")
    if args.clients < config.min_nodes:
        # In simulation the node count is fixed at start: every round would wait
        # node-wait-timeout for nodes that cannot exist.
        parser.error(
            f"--clients = {args.clients} is fewer than the run config's min-nodes = {config.min_nodes}: "
            f"a simulation of {args.clients} client(s) never has {config.min_nodes} nodes, and each round would "
            f"wait node-wait-timeout ({config.node_wait_timeout:g} s) for them; use --clients {config.min_nodes} "
            f"or more, or --run-config \"min-nodes={args.clients}\"")
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    home = launch.Path(args.flwr_home)
    launch.write_connection(home, CONNECTION, launch.Ports().address)
    superlink = launch.start_superlink(home, launch.Ports(), simulation=True, ray_address=args.ray_address)
    try:
        run_id = launch.flwr_run(
            home, CONNECTION, args.run_config,
            federation_config=f"num-supernodes={args.clients} client-resources-num-cpus=1"
                              f" client-resources-num-gpus={args.client_gpus:g}",
        )
        status = launch.wait_finished(home, CONNECTION, run_id, timeout=120)
    finally:
        launch.stop([superlink])
    if status != "finished:completed":
        print(f"fl-distill: run {run_id} ended {status}; see the log above and {home / 'superlink.log'}", file=sys.stderr)
        return 1
    run_dir = config.resume_from or f"{config.out_dir}/{run_id}"  # relative to the repository, where the SuperLink runs
    print(f"fl-distill: run {run_id} {status}; outputs in {run_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
