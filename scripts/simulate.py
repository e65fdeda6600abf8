"""Simulate a run on this host: a SuperLink in simulation mode, `flwr run`, status check.

    python -m scripts.simulate [--clients N] [--run-config "k=v ..."]

The SuperLink is started for this run and stopped afterwards, so nothing is
left listening. Exits non-zero unless Flower reports the run
'finished:completed' (`flwr run` itself exits 0 even when a run fails).
"""

from __future__ import annotations

import argparse
import sys

from scripts import launch

CONNECTION = "fl-distill-sim"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="virtual clients (SuperNodes), default 10")
    parser.add_argument("--run-config", default="", help='overrides of [tool.flwr.app.config], e.g. "num-server-rounds=3"')
    parser.add_argument("--flwr-home", default=str(launch.REPO / ".flwr"), help="Flower home (state, logs)")
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients = {args.clients} is not allowed; use 1 or more")

    home = launch.Path(args.flwr_home)
    launch.write_connection(home, CONNECTION, launch.Ports().address)
    superlink = launch.start_superlink(home, launch.Ports(), simulation=True)
    try:
        run_id = launch.flwr_run(
            home, CONNECTION, args.run_config,
            federation_config=f"num-supernodes={args.clients} client-resources-num-cpus=1",
        )
        status = launch.wait_finished(home, CONNECTION, run_id, timeout=120)
    finally:
        launch.stop([superlink])
    if status != "finished:completed":
        print(f"fl-distill: run {run_id} ended {status}; see the log above and {home / 'superlink.log'}", file=sys.stderr)
        return 1
    print(f"fl-distill: run {run_id} {status}; outputs in outputs/{run_id}/ (or the out-dir you set)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
