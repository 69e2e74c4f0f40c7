"""Prometheus metrics of one swarm-node process.

Contract:
- `NodeMetrics` owns a private `CollectorRegistry` (plus the process, platform and GC
  collectors), so several nodes or tests in one interpreter never share series.
- Every label is bounded (strategy, outcome, op, channel, kind, reason). Never label by
  peer id, multiaddr, step or hash: under churn each value becomes a permanent series.
  Per-peer detail belongs in logs and `/status`.
- Known label values are pre-created at 0, so dashboards and alerts see every outcome
  before the first event (and `rate()` works from the first scrape).
- Metrics must be updated only in the process that serves them. hivemind runs the DHT in a
  forked process; an `inc()` there is silently lost, so return values to the parent and
  update metrics here. No multiprocess mode.
"""
from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# `_created` series double the counter count and mean nothing to our alerts.
disable_created_metrics()

BOOTSTRAP_OUTCOMES = ("ok", "failed")
DHT_OPS = ("get", "store")
DHT_OUTCOMES = ("ok", "timeout", "error")
CHANNELS = ("dht", "averaging", "state", "rollouts")
ROUND_OUTCOMES = ("ok", "timeout", "no_peers", "error", "resync", "cancelled")
RECOVERY_KINDS = ("rebootstrap", "state_download", "resume")
RECOVERY_OUTCOMES = ("ok", "failed")

DHT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class NodeMetrics:
    """All metrics of one node, registered in `self.registry`.

    `strategy` is the node's averaging strategy: `rounds` is pre-created for it only.
    `reject_reasons` are the bounded reasons for `rejected_messages` (the codec's list plus
    the node's own); other reasons still work but appear only once used.
    Constructing never raises for valid names; it performs no I/O.
    """

    def __init__(self, strategy: str, reject_reasons: Sequence[str] = ()) -> None:
        self.strategy = strategy
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        # identity and readiness
        self.info = Info("swarm_node", "Static facts about this node (version, strategy, role, device_type).", registry=r)
        self.ready = Gauge("swarm_ready", "1 when /readyz answers 200, else 0.", registry=r)

        # membership
        self.routing_table_peers = Gauge(
            "swarm_dht_routing_table_peers", "Peers in the DHT routing table (the isolation signal).", registry=r
        )
        self.peers_seen = Gauge("swarm_peers_seen", "Live peer records of this run seen in the DHT.", registry=r)
        self.peer_joins = Counter("swarm_peer_joins", "Peers that appeared in the DHT view.", registry=r)
        self.peer_leaves = Counter("swarm_peer_leaves", "Peers that left or expired from the DHT view.", registry=r)
        self.bootstrap_attempts = Counter(
            "swarm_bootstrap_attempts", "(Re-)bootstrap attempts against the initial peers.", ["outcome"], registry=r
        )
        _precreate(self.bootstrap_attempts, outcome=BOOTSTRAP_OUTCOMES)

        # DHT
        self.dht_requests = Counter("swarm_dht_requests", "DHT requests by operation and outcome.", ["op", "outcome"], registry=r)
        _precreate(self.dht_requests, op=DHT_OPS, outcome=DHT_OUTCOMES)
        self.dht_request_duration = Histogram(
            "swarm_dht_request_duration_seconds", "DHT request latency.", ["op"], buckets=DHT_BUCKETS, registry=r
        )
        _precreate(self.dht_request_duration, op=DHT_OPS)

        # network
        self.net_tx_bytes = Counter("swarm_network_transmit_bytes", "Payload bytes sent, by channel.", ["channel"], registry=r)
        self.net_rx_bytes = Counter("swarm_network_receive_bytes", "Payload bytes received, by channel.", ["channel"], registry=r)
        _precreate(self.net_tx_bytes, channel=CHANNELS)
        _precreate(self.net_rx_bytes, channel=CHANNELS)

        # sync
        self.rounds = Counter(
            "swarm_averaging_rounds", "Averaging rounds by strategy and outcome.", ["strategy", "outcome"], registry=r
        )
        _precreate(self.rounds, strategy=(strategy,), outcome=ROUND_OUTCOMES)
        self.round_duration = Histogram(
            "swarm_averaging_round_duration_seconds", "Wall time of one averaging round.", buckets=ROUND_BUCKETS, registry=r
        )
        self.group_size = Gauge("swarm_averaging_group_size", "Peers in the last averaging group.", registry=r)
        self.stragglers = Counter(
            "swarm_round_stragglers", "Expected peers a round went on without (missed its deadline), counted by the "
            "peer that closed the round.", registry=r)
        self.last_successful_round = Gauge(
            "swarm_last_successful_round_timestamp_seconds", "Unix time of the last ok round (0 = never).", registry=r
        )

        # throughput
        self.local_samples = Counter("swarm_local_samples", "Samples this node trained on.", registry=r)
        self.local_tokens = Counter("swarm_local_tokens", "Tokens this node trained on.", registry=r)
        self.local_step = Gauge("swarm_local_step", "Local optimizer step.", registry=r)
        self.step_duration = Histogram(
            "swarm_step_duration_seconds", "Wall time of one local training step.", buckets=STEP_BUCKETS, registry=r
        )
        self.train_loss = Gauge("swarm_train_loss", "Latest local training loss.", registry=r)
        self.val_loss = Gauge("swarm_validation_loss", "Latest validation loss.", registry=r)
        self.samples_per_second = Gauge("swarm_local_samples_per_second", "Recent local training throughput.", registry=r)
        self.device_memory = Gauge("swarm_device_memory_bytes", "Memory held for training: bytes allocated on the "
                                   "CUDA device, or the process's resident set size on the CPU.", registry=r)
        # 0 on a node without a GPU: it holds nothing there
        self.gpu_allocated = Gauge("swarm_gpu_memory_allocated_bytes", "Bytes of tensors allocated on the CUDA "
                                   "device.", registry=r)
        self.gpu_reserved = Gauge("swarm_gpu_memory_reserved_bytes", "Bytes the CUDA caching allocator holds.",
                                  registry=r)
        self.gpu_utilization = Gauge("swarm_gpu_utilization_ratio", "Share of the last sample period the GPU was "
                                     "busy, as the driver reports it (NVML); absent where it cannot.", ["device"],
                                     registry=r)

        # hygiene and recovery
        self.rejected_messages = Counter(
            "swarm_rejected_messages", "Inbound messages or records rejected, by reason.", ["reason"], registry=r
        )
        _precreate(self.rejected_messages, reason=tuple(dict.fromkeys(reject_reasons)))
        self.recoveries = Counter("swarm_recoveries", "Recovery actions by kind and outcome.", ["kind", "outcome"], registry=r)
        _precreate(self.recoveries, kind=RECOVERY_KINDS, outcome=RECOVERY_OUTCOMES)
        self.spare_gpu_paused = Gauge("swarm_spare_gpu_paused", "1 while training yields the GPU to its owner.", registry=r)
        self.quorum_waiting = Gauge("swarm_quorum_waiting", "1 while this peer sees fewer peers than the run-long "
                                    "quorum and waits instead of stepping (sync, gradcode).", registry=r)
        self.quorum_needed = Gauge("swarm_quorum_needed", "Peers (this one included) the run-long quorum needed at "
                                   "the last check (sync, gradcode; 0 = not checked yet).", registry=r)
        self.quorum_waits = Counter("swarm_quorum_waits", "Times this peer fell below the run-long quorum and "
                                    "stopped stepping.", registry=r)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format 0.0.4 (what `/metrics` serves)."""
        return generate_latest(self.registry)


def _precreate(metric, **values: Sequence[str]) -> None:
    """Create every combination of the given label values so each is exported at 0."""
    combos: list[dict[str, str]] = [{}]
    for name, options in values.items():
        combos = [{**c, name: v} for c in combos for v in options]
    for labels in combos:
        if labels:
            metric.labels(**labels)
