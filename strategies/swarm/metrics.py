"""The `swarm` strategy's own Prometheus series. Labels are bounded: stage (< --stages), op,
outcome, reason, method; never peer ids."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_OPS = ("forward", "backward", "state")
RPC_OUTCOMES = ("ok", "timeout", "error")
RETRY_REASONS = ("timeout", "error", "rejected", "wrong_stage", "busy", "no_peers")


class SwarmMetrics:
    def __init__(self, registry, num_stages: int) -> None:
        r = registry
        self.stage = Gauge("swarm_pipeline_stage", "The pipeline stage this peer serves (-1 while choosing).",
                           registry=r)
        self.stage.set(-1)
        self.stage_peers = Gauge("swarm_stage_peers", "Live peers announcing each stage.", ["stage"], registry=r)
        self.load_ratio = Gauge("swarm_stage_load_ratio", "Stage queue per unit of capacity, relative to the mean "
                                "over stages (1 = balanced).", ["stage"], registry=r)
        self.capacity = Gauge("swarm_stage_capacity_samples_per_second", "Sum of announced throughput per stage.",
                              ["stage"], registry=r)
        self.queue_depth = Gauge("swarm_stage_queue_depth", "Requests waiting or running on this peer's stage "
                                 "server.", registry=r)
        self.stage_step = Gauge("swarm_stage_global_step", "Optimizer steps of this peer's stage replica.",
                                ["stage"], registry=r)
        for k in range(num_stages):
            for g in (self.stage_peers, self.load_ratio, self.capacity):
                g.labels(stage=str(k))
        self.rpcs = Counter("swarm_pipeline_rpc", "Pipeline RPCs this peer sent, by stage, op and outcome.",
                            ["stage", "op", "outcome"], registry=r)
        self.retries = Counter("swarm_pipeline_rpc_retries", "Pipeline calls re-sent to another replica of the same "
                               "stage, by reason.", ["stage", "reason"], registry=r)
        self.bans = Counter("swarm_pipeline_peer_bans", "Peers banned until their record expires.", ["stage"],
                            registry=r)
        self.microbatches = Counter("swarm_pipeline_microbatches", "Micro-batches this trainer drove, by outcome.",
                                    ["outcome"], registry=r)
        for o in ("ok", "lost"):
            self.microbatches.labels(outcome=o)
        self.mb_duration = Histogram("swarm_pipeline_microbatch_duration_seconds", "Forward + backward through the "
                                     "whole pipeline.", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                     registry=r)
        self.served = Counter("swarm_stage_requests_served", "Stage RPCs this server answered, by op and outcome.",
                              ["op", "outcome"], registry=r)
        self.rebalance_checks = Counter("swarm_stage_rebalance_checks", "Rebalancing decisions evaluated.", registry=r)
        self.rebalances = Counter("swarm_stage_rebalances", "Moves of this peer to another stage.", registry=r)
        self.state_download = Histogram("swarm_state_download_duration_seconds", "Fetching a stage's weights from "
                                        "peers.", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.stage_lost = Counter("swarm_checkfree_stage_lost", "Stages seen with no live peer.", ["stage"], registry=r)
        self.cf_recoveries = Counter("swarm_checkfree_recoveries", "Stage rebuilds by method.", ["stage", "method"],
                                     registry=r)
        self.cf_duration = Histogram("swarm_checkfree_recovery_duration_seconds", "Rebuilding a lost stage.",
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.neighbor_norm = Gauge("swarm_checkfree_neighbor_grad_norm", "Gradient norms of the neighbours used by "
                                   "the last rebuild.", ["stage"], registry=r)
        self.lr_multiplier = Gauge("swarm_checkfree_lr_multiplier", "LR multiplier of this peer's stage.", ["stage"],
                                   registry=r)
        self.swapped = Counter("swarm_pipeline_swapped_microbatches", "Micro-batches this trainer completed in the "
                               "CheckFree+ swapped order (--checkfree-swaps), by pair: first = stages 0<->1, last = "
                               "S-2<->S-1.", ["pair"], registry=r)
        self.copies = Counter("swarm_checkfree_copy_recoveries", "Stages rebuilt by copying one neighbour, by kind: "
                              "checkfree_plus = the swap partner under --checkfree-swaps, naive = the last stage "
                              "without swaps, one_neighbour = a middle stage whose other neighbour was unreachable.",
                              ["stage", "kind"], registry=r)
        self.averaging = Counter("swarm_stage_averaging", "Within-stage averaging rounds by outcome: ok = "
                                 "all-reduce among the stage's replicas, gossip = fell back to a mix with one "
                                 "replica, failed = neither.", ["outcome"], registry=r)
