"""Toy simulator: sync time and compute utilization as a swarm grows, DiLoCo vs NoLoCo.

Pure standard library, deterministic for a seed, runs in about a second.

  .venv/bin/python bench/sim_sync_scaling.py [--bytes 5e8 --bandwidth-bps 1e9 --latency-s 0.05
      --compute-s 300 --jitter 0.3 --rounds 200 --seed 0 --n 4 8 16 64 256 1024]

Network model (see the comment above `_link_time`): per hop latency L and bandwidth B, full
duplex; ring or tree all-reduce for DiLoCo, one pair exchange for NoLoCo. Compute and round
models: see `simulate`. Utilization of a peer = its total compute time / its total wall time
over all rounds; the reported value is the mean over peers. Assumptions and omissions:
homogeneous links; no congestion, packet loss, stragglers beyond the jitter, failures,
matchmaking or commit messages; no overlap of compute and communication; the extra rounds
NoLoCo needs (H 50 vs 100 in the released configs) are not modelled: this compares time per
round, not time to a given loss.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

DEFAULT_NS = (4, 8, 16, 64, 256, 1024)


# Network model (per hop: latency L seconds, bandwidth B bits/s, full duplex):
#   * units: S is in bytes with GB = 1e9 (decimal), B is in bits/s, so one full model crosses a
#     link in 8*S/B seconds (0.5 GB at 1 Gb/s = 4 s). This is the convention that reproduces the
#     published figures; with bytes/s or GiB they would be 8x or 1.07x off.
#   * ring all-reduce: 2(N-1) steps, each moving S/N:      2(N-1) * (L + 8S/(N B))
#   * tree (binary reduce, then broadcast), full S a hop:  2 ceil(log2 N) * (L + 8S/B)
#   * pair exchange: one full S each way at the same time: L + 8S/B   (independent of N)
#   With the defaults: N=4 ring 6.30 / tree 16.20 / pair 4.05 s; N=1024 ring 110.29 / tree 81.00 /
#   pair 4.05 s. The published pair time "4.0" is 4.05 rounded to one decimal (the float 4.05 is
#   just below 4.05, so it rounds down); all other figures match to 0.01 s.
def _link_time(size_bytes: float, bw_bps: float) -> float:
    """Seconds to push `size_bytes` through one link of `bw_bps` bits per second."""
    return 8.0 * size_bytes / bw_bps


def sync_time_ring(n: int, size_bytes: float, bw_bps: float, latency_s: float) -> float:
    """Ring all-reduce (reduce-scatter + all-gather): 2(N-1) steps of S/N bytes each."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * (latency_s + _link_time(size_bytes / n, bw_bps))


def sync_time_tree(n: int, size_bytes: float, bw_bps: float, latency_s: float) -> float:
    """Binary-tree reduce then broadcast: 2*ceil(log2 N) hops, each moving the full model."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * (latency_s + _link_time(size_bytes, bw_bps))


def sync_time_pair(n: int, size_bytes: float, bw_bps: float, latency_s: float) -> float:
    """Pair exchange: both partners send the full model at once over a full-duplex link.

    `n` is accepted for a uniform signature; the time does not depend on it.
    """
    return latency_s + _link_time(size_bytes, bw_bps)


def sync_time_allreduce(n: int, size_bytes: float, bw_bps: float, latency_s: float) -> float:
    """What a DiLoCo round pays: the faster of ring and tree for this N."""
    return min(sync_time_ring(n, size_bytes, bw_bps, latency_s),
               sync_time_tree(n, size_bytes, bw_bps, latency_s))


def simulate(n: int, *, compute_s: float = 300.0, jitter: float = 0.3, rounds: int = 200, seed: int = 0,
             size_bytes: float = 5e8, bw_bps: float = 1e9, latency_s: float = 0.05) -> dict:
    """Simulate `rounds` rounds of an `n`-peer swarm; returns sync times and utilizations.

    Compute model: each peer's compute per round is C * exp(sigma * z), z ~ N(0, 1) i.i.d. per
    peer and round (lognormal: always positive, median C, mean C*exp(sigma^2/2), a right tail
    like real slow hosts). jitter=0 gives exactly C everywhere. Draws come from one seeded RNG
    and are shared by both strategies (common random numbers), so their difference is not
    sampling noise.

    Round models:
      * DiLoCo: a global barrier, then an all-reduce (the faster of ring and tree for that N):
        round = max_i(c_i) + sync; everybody's round lasts that long.
      * NoLoCo: a fresh random perfect matching every round (an odd peer out just computes and
        skips the exchange); a peer waits only for its partner: round_i = max(c_i, c_partner)
        + pair. Pairs are treated as independent and every round starts from a clean slate
        ("independent" model, the one this bench asserts on).
      * NoLoCo "timeline" (an extra column): the same pairs and draws, but each peer starts its
        next round when its own exchange ends, so a delay it inherited from a slow partner is
        passed on to its next partner. DiLoCo is identical in both models because its barrier
        resets every peer's clock each round.
    For DiLoCo, utilization is sum_r mean_i(c_ri) / sum_r round_r.
    """
    if n < 2:
        raise ValueError("need at least 2 peers")
    rng = random.Random(seed)
    compute = [[compute_s * math.exp(jitter * rng.gauss(0.0, 1.0)) for _ in range(n)] for _ in range(rounds)]
    pairings = []
    for _ in range(rounds):
        perm = list(range(n))
        rng.shuffle(perm)
        pairings.append(perm)

    allreduce = sync_time_allreduce(n, size_bytes, bw_bps, latency_s)
    pair = sync_time_pair(n, size_bytes, bw_bps, latency_s)

    busy = [0.0] * n                 # total compute per peer (the same for every model)
    diloco_wall = 0.0                # every DiLoCo peer has the same wall time
    noloco_wall = [0.0] * n          # independent model: sum of own round times
    clock = [0.0] * n                # timeline model: when each peer finished its last round
    for c, perm in zip(compute, pairings):
        for i in range(n):
            busy[i] += c[i]
        diloco_wall += max(c) + allreduce
        for k in range(0, n - 1, 2):
            a, b = perm[k], perm[k + 1]
            t = max(c[a], c[b]) + pair
            noloco_wall[a] += t
            noloco_wall[b] += t
            end = max(clock[a] + c[a], clock[b] + c[b]) + pair
            clock[a] = clock[b] = end
        if n % 2:                    # odd peer out: computes, skips the exchange
            lone = perm[-1]
            noloco_wall[lone] += c[lone]
            clock[lone] += c[lone]

    util_diloco = sum(busy) / n / diloco_wall
    util_noloco = sum(busy[i] / noloco_wall[i] for i in range(n)) / n
    util_timeline = sum(busy[i] / clock[i] for i in range(n)) / n
    return {
        "n": n,
        "sync_ring_s": sync_time_ring(n, size_bytes, bw_bps, latency_s),
        "sync_tree_s": sync_time_tree(n, size_bytes, bw_bps, latency_s),
        "sync_pair_s": pair,
        "sync_allreduce_s": allreduce,
        "util_diloco": util_diloco,
        "util_noloco": util_noloco,
        "util_noloco_timeline": util_timeline,
        "ratio": util_noloco / util_diloco,
        "ratio_timeline": util_timeline / util_diloco,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=float, default=5e8, help="model size in bytes (GB = 1e9)")
    p.add_argument("--bandwidth-bps", type=float, default=1e9, help="link bandwidth in bits/s")
    p.add_argument("--latency-s", type=float, default=0.05, help="latency per hop")
    p.add_argument("--compute-s", type=float, default=300.0, help="median compute time per round")
    p.add_argument("--jitter", type=float, default=0.3, help="sigma of the lognormal compute jitter")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS))
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    rows = [simulate(n, compute_s=a.compute_s, jitter=a.jitter, rounds=a.rounds, seed=a.seed,
                     size_bytes=a.bytes, bw_bps=a.bandwidth_bps, latency_s=a.latency_s) for n in a.n]
    print(f"model {a.bytes / 1e9:g} GB, links {a.bandwidth_bps / 1e9:g} Gb/s + {a.latency_s * 1e3:g} ms/hop; "
          f"compute {a.compute_s:g} s x exp({a.jitter:g} z) per peer and round; {a.rounds} rounds, seed {a.seed}")
    print("DiLoCo: global barrier + best of ring/tree.  NoLoCo: random pairs, wait for partner + pair exchange;")
    print("'indep' restarts every round, 'timeline' carries inherited delays into the next round.")
    hdr = (f"{'N':>5} | {'ring s':>7} {'tree s':>7} {'pair s':>6} | {'DiLoCo':>6} {'NoLoCo':>6} {'ratio':>5} |"
           f" {'NoLoCo':>8} {'ratio':>5}")
    print(f"{'':5} | {'sync time per round':^22} | {'utilization (indep)':^20} | {'timeline':^14}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['n']:>5} | {r['sync_ring_s']:>7.2f} {r['sync_tree_s']:>7.2f} {r['sync_pair_s']:>6.2f} |"
              f" {r['util_diloco']:>6.3f} {r['util_noloco']:>6.3f} {r['ratio']:>5.2f} |"
              f" {r['util_noloco_timeline']:>8.3f} {r['ratio_timeline']:>5.2f}")
    summary = {"bench": "sim_sync_scaling", "params": vars(a), "elapsed_s": round(time.perf_counter() - t0, 3),
               "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
