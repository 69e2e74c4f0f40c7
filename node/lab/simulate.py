"""`swarm-node simulate`: pick a scenario (file or built-in), run it, print the verdict.

Exit codes: 0 every check passed; 1 the run finished but a check failed (the report says
which); 2 bad scenario or usage; 3 `--netns` where the lab cannot run (not root, no netns);
130 interrupted (the swarm and the lab are torn down first).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from swarm_node.lab.churn import RunOptions, run_scenario
from swarm_node.lab.launcher import LaunchError
from swarm_node.lab.churn_scenarios import profile_for
from swarm_node.lab.scenario import Scenario, ScenarioError


def _raise_interrupt(signum, frame):  # SIGTERM takes the same teardown path as Ctrl-C
    raise KeyboardInterrupt


def load_scenario(spec: str, strategy: str) -> Scenario:
    profile = profile_for(strategy)
    if spec in profile.scenarios:
        return Scenario.parse(profile.scenarios[spec], name=f"{spec} ({strategy})")
    path = Path(spec)
    if path.exists():
        return Scenario.from_file(path)
    raise ScenarioError(f"no scenario file {spec!r} and no built-in scenario of that name for {strategy} "
                        f"(built-in: {', '.join(profile.scenarios)})")


def simulate(args: argparse.Namespace, extra: list[str]) -> int:
    profile = profile_for(args.strategy)
    if args.list:
        for name, text in profile.scenarios.items():
            print(f"{name}:\n  " + "\n  ".join(text.strip().splitlines()))
        return 0
    try:
        scenario = load_scenario(args.scenario, args.strategy)
    except ScenarioError as e:
        print(f"swarm-node simulate: {e}", file=sys.stderr)
        return 2
    if args.netns:
        from swarm_node.lab.netlab import capability

        ok, why = capability()
        if not ok:
            print(f"swarm-node simulate: --netns unavailable: {why}. Run without --netns for loopback.",
                  file=sys.stderr)
            return 3
    opts = RunOptions(strategy=args.strategy, peers=args.peers, scenario=scenario, netns=args.netns,
                      node_args=[*profile.node_args, *extra],
                      max_steps=profile.max_steps if args.max_steps is None else args.max_steps,
                      stop_together=profile.stop_together and not args.max_steps,
                      cut_off_holds=profile.cut_off_holds,
                      duration_s=args.duration_s, settle_s=args.settle_s, consistency=profile.consistency, loss=profile.loss,
                      workdir=args.workdir,
                      strict=args.strict, progress=lambda line: print(line, flush=True))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = run_scenario(opts)
    except ScenarioError as e:
        print(f"swarm-node simulate: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"swarm-node simulate: a node failed to start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swarm-node simulate: interrupted; every node and the lab were torn down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.format())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str))
    return 0 if report.ok else 1
