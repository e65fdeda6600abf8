"""The ServerApp: FedAvg rounds, distillation on the proxy set, and the run's outputs."""

from __future__ import annotations

import functools
import sys
import tempfile
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.config import ConfigError, RunConfig
from common.data import partition_sizes, server_sets
from common.model_families import pack, parse_partitions, unpack
from common.models import build_model, build_student, model_size
from common.training import setup_compute
from server import checkpoint
from server.aggregation import build_aggregator
from server.delivery import Delivery, delivered_models
from server.distillation import ServerDistillation
from server.families import ModelFamilies
from server.fusion_check import FusionCheck
from server.message_index import index_pending_messages
from server.privacy import with_privacy
from server.reply_poll import ShortPollGrid
from server.sampling import NoNodesError, SimulationRoster, TrainingBudget, ask_nodes
from server.reporting import RunReport
from server.strategy import DistillStrategy
from server.validation import ExampleCounts

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        config = RunConfig.from_mapping(context.run_config)
        device = setup_compute(config.device)
        proxy_set, test_set = server_sets(config)
        run(grid, config, context.run_id, device, proxy_set, test_set)
    except (ConfigError, NoNodesError) as err:
        log(ERROR, "fl-distill: %s", err)
        # Fail the run (status finished:failed) with the message alone: this
        # process ends here, and a stack trace would only bury the bad value.
        sys.tracebacklimit = 0
        raise


def run(grid: Grid, config: RunConfig, run_id: int, device, proxy_set, test_set) -> None:
    simulation = isinstance(grid, InMemoryGrid)
    if simulation:  # node lookups that do not scan every pending message
        index_pending_messages(grid.state)
    torch.manual_seed(config.seed)  # the same seed gives the same initial models
    families = config.families
    models = {family: build_model(family, test_set.input_shape, test_set.num_classes) for family in families}
    teacher = models[families[0]]  # the global model: the first family's
    log(INFO, "fl-distill: %s, %s, student %s, proxy set %d, test set %d, device %s", config.dataset,
        ", ".join(f"{'teacher' if len(families) == 1 else 'family ' + repr(f)} {model_size(m)}" for f, m in models.items()),
        model_size(build_student(test_set.input_shape, test_set.num_classes)), len(proxy_set), len(test_set), device)
    resumed = checkpoint.load(config) if config.resume_from else None
    distillation = ServerDistillation(config, proxy_set, device) if config.distill != "off" else None
    done = 0
    if resumed is not None:
        done = resumed.round
        for family, arrays in unpack(ArrayRecord(resumed.global_model), families).items():
            models[family].load_state_dict(arrays.to_torch_state_dict())
        if distillation is not None:
            distillation.load_state_dict(resumed.distillation)
        log(INFO, "fl-distill: resuming %s after round %d; Flower's [ROUND r/N] below is round r + %d of %d",
            config.resume_from, done, done, config.num_server_rounds)
    aggregator, privacy = with_privacy(build_aggregator(config), config)  # one family's; dp=central: one family
    strategies = {families[0]: aggregator, **{family: build_aggregator(config) for family in families[1:]}}
    if resumed is not None and privacy is not None:
        privacy.load_state_dict(resumed.privacy)
    strategy = DistillStrategy(
        ModelFamilies(strategies, parse_partitions(config.small_partitions)),
        distillation,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_nodes=config.min_nodes,
        num_partitions=config.num_partitions,
        node_wait_timeout=config.node_wait_timeout,
        round_timeout=config.round_timeout,
        max_update_norm=config.max_update_norm,
        round_offset=done,
        sampling_seed=config.seed,
        fusion_check=FusionCheck(config.fusion_check_fraction, config.min_nodes, config.round_timeout, config.seed,
                                 config.fusion_check_margin, nodes=config.fusion_check_nodes,
                                 max_ratio=config.max_examples_ratio) if config.fusion_check == "clients" else None,
        example_counts=ExampleCounts(functools.lru_cache(8)(functools.partial(partition_sizes, config)),
                                     config.max_examples_ratio),
        budget=TrainingBudget(config.example_dp_rounds) if config.dp == "example" else None,
        roster=SimulationRoster(grid.state, config.seed) if simulation else ask_nodes,
    )
    strategy.record_partitions = parse_partitions(config.record_updates)
    if resumed is not None:
        strategy.load_partition_state(resumed.partitions)
        strategy.rng.setstate(resumed.python_rng)
    run_dir = Path(config.resume_from) if resumed else Path(config.out_dir) / str(run_id)
    report = RunReport(config, run_dir, test_set, device, resume_after=done)
    student = distillation.student if distillation else None
    polling_grid = ShortPollGrid(grid, poll_interval=0.1)
    delivery = Delivery(config, run_id, run_dir, proxy_set.images, test_set, simulation=simulation)
    names = delivered_models(config, student is not None)

    def models_to_deliver() -> dict:
        return {name: {"student": student, "global": teacher}[name] for name in names}

    def other_families() -> dict:
        """{family: (its global model, its last test accuracy)}: each family past the first gets its own."""
        return {family: (models[family], report.rows[-1]["families"][family]["accuracy"]) for family in families[1:]}

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and done:
            return None  # the run being resumed recorded its rounds
        for family, record in unpack(arrays, families).items():
            models[family].load_state_dict(record.to_torch_state_dict())
        stats = strategy.round_stats.get(server_round + done, {})
        if privacy is not None and server_round > 0:
            stats["privacy"] = privacy.record_round(stats)
        metrics = report.record_round(server_round + done, teacher, student, stats, models)
        report.record_updates(strategy.recorded)
        checkpoint.save(run_dir, server_round + done, config, arrays.to_torch_state_dict(),
                        distillation.state_dict() if distillation else {},
                        privacy.state_dict() if privacy else {}, strategy.partition_state(),
                        strategy.rng.getstate())
        if names and delivery.due(server_round + done):
            row = report.rows[-1]
            accuracies = {"global": row["teacher"]["accuracy"], "student": row.get("student", {}).get("accuracy")}
            with tempfile.TemporaryDirectory() as folder:
                report.record_delivery(*delivery.send(polling_grid, strategy, server_round + done,
                                                      models_to_deliver(), accuracies, Path(folder), other_families()))
        return metrics

    strategy.start(
        grid=polling_grid,
        initial_arrays=pack({family: ArrayRecord(model.state_dict()) for family, model in models.items()}),
        # Local DP: the clients noise with the δ the server accounts at.
        train_config=ConfigRecord({"dp-delta": privacy.delta} if privacy else {}),
        num_rounds=config.num_server_rounds - done,
        timeout=config.round_timeout,
        evaluate_fn=evaluate_round,
    )
    summary = report.finish(teacher, student, calibration=proxy_set.images, families=models)
    if names:
        accuracies = {"global": summary["teacher"]["accuracy"], "student": summary.get("student", {}).get("accuracy"),
                      "student-int8": summary.get("student-int8", {}).get("accuracy")}
        report.record_delivery(*delivery.send(polling_grid, strategy, summary["rounds"], models_to_deliver(),
                                              accuracies, run_dir, other_families()))
