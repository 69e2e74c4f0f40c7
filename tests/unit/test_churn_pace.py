"""The churn runner's estimate of the swarm's pace, which places the common drain step."""
from __future__ import annotations

from swarm_node.lab.churn import pace_of


def test_pace_ignores_stalls_and_download_jumps_and_takes_the_fastest_peer():
    steady = [(float(t), "n0", 20 * t, None) for t in range(10)]  # 20 steps/s
    # n1 stalls for 6 s (re-joining), then jumps 300 steps (a state download), then trains at 20/s
    n1 = [(0.0, "n1", 0), (1.0, "n1", 20), (2.0, "n1", 20), (7.0, "n1", 20), (8.0, "n1", 320), (9.0, "n1", 340),
          (9.5, "n1", 350)]
    samples = steady + [(t, n, s, None) for t, n, s in n1]
    assert pace_of(samples, 9.5, 20.0) == 20.0
    # the plain average over the window of a peer that stalled would read far lower
    assert pace_of([(t, n, s, None) for t, n, s in n1[:4]], 7.0, 20.0) == 20.0
    assert pace_of([(1.0, "n0", 5, None)], 1.0, 20.0) == 0.0  # one sample: no pace
    assert pace_of(steady, 100.0, 20.0) == 0.0  # samples older than the window are not used
