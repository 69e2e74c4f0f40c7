"""`swarm-node` command line. Thin: parse, build a validated config, hand over.

  join        run a node (every NodeConfig field is a flag, an env var and a TOML key)
  check       preflight: device, memory, disk, port, fd limit, initial peers
  status      this node's state, via its local gRPC control API
  peers       the peers this node sees
  drain       ask a running node to finish its step and leave
  demo        start N real nodes on loopback, show progress, summarise
  simulate    run a churn scenario (kill, term, restart, partition, ...) against real nodes
  strategies  list installed strategies
  identity    show (or create) the node's peer id

Exit codes: 0 ok, 2 usage/config, 3 startup/preflight failed, 4 could not join, 75 drain --at-step N
refused because the node is already past N (ask again for a later step), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from swarm_node import __version__
from swarm_node.config import DEFAULT_STATE_DIR, ConfigError, NodeConfig, load_config
from swarm_node.strategies.registry import DEFAULT_STRATEGY

EXIT_CONFIG = 2


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field; only flags the user gives reach the config."""
    p.add_argument("--config", type=Path, default=None, help="TOML file with any of the settings below.")
    for name, field in NodeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env SWARM_NODE_{name.upper()}; default: {_default(field)}]"
        origin = typing.get_origin(field.annotation)
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif origin is list:
            p.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="MADDR", help=help_text)
        else:
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(), help=help_text)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _default(field) -> str:
    if field.default_factory is not None:
        return repr(field.default_factory())
    return str(field.default)


def _config_from(args: argparse.Namespace) -> NodeConfig:
    values = {k: v for k, v in vars(args).items() if k in NodeConfig.model_fields}
    return load_config(values, args.config)


def _cmd_join(args: argparse.Namespace) -> int:
    cfg = _config_from(args)
    if not cfg.initial_peers and not cfg.new_swarm and not cfg.discover:
        raise ConfigError("give --initial-peers MADDR (the join line printed by a running node), "
                          "--discover to find peers on the local network, or --new-swarm to start a new swarm")
    from swarm_node.logs import configure_logging

    configure_logging(cfg.log_format, cfg.log_level)
    from swarm_node.daemon import run_node

    return run_node(cfg)


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _config_from(args)
    from swarm_node.preflight import exit_code, format_findings, run_preflight

    findings = run_preflight(device=cfg.device, initial_peers=cfg.initial_peers, host=cfg.host, port=cfg.port,
                             state_dir=cfg.state_dir)
    if args.json:
        print(json.dumps([f.__dict__ if not hasattr(f, "_asdict") else f._asdict() for f in findings], default=str))
    else:
        print(format_findings(findings))
    return exit_code(findings)


def _control_address(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.control_addr:
        return args.control_addr, None
    node_file = Path(args.state_dir) / "node.json"
    try:
        info = json.loads(node_file.read_text())
        return info["control"], str(args.state_dir)
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"no running node found: {node_file} is missing or unreadable "
                          "(start one with `swarm-node join`, or pass --state-dir / --control-addr)") from None


def _cmd_status(args: argparse.Namespace) -> int:
    from swarm_node.control import EXIT_PAST_STEP, ControlClient, ControlError, read_token
    from swarm_node.tables import format_peers, format_status

    address, state_dir = _control_address(args)
    try:
        with ControlClient(address, state_dir=state_dir, token=read_token(args.state_dir)) as client:
            if args.command == "status":
                st = client.status()
                print(st.model_dump_json(indent=2) if args.json else format_status(st, wide=args.wide))
            elif args.command == "peers":
                peers = client.peers()
                print(json.dumps([p.model_dump(mode="json") for p in peers], indent=2) if args.json
                      else format_peers(peers, wide=args.wide))
            else:
                outcome = client.drain(args.reason, args.at_step)
                print(json.dumps(outcome._asdict()) if args.json else outcome.detail)
                if outcome.past_step:
                    return EXIT_PAST_STEP
                return 0 if outcome.accepted else 1
    except ControlError as e:
        print(f"swarm-node: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from swarm_node.strategies.registry import available

    for name, target in available().items():
        print(f"{name:12s} {target}")
    return 0


def _cmd_identity(args: argparse.Namespace) -> int:
    from swarm_node.identity import IdentityError, ensure_identity

    try:
        ident = ensure_identity(Path(args.state_dir) / "identity.key")
    except IdentityError as e:
        print(f"swarm-node: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"peer id: {ident.peer_id}\nkey file: {ident.path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from swarm_node.train.export import ExportError, export_model
    from swarm_node.train.models import ModelError

    try:
        res = export_model(Path(args.state_dir), Path(args.out), weights=args.weights)
    except (ExportError, ModelError) as e:
        print(f"swarm-node export: {e}", file=sys.stderr)
        return EXIT_CONFIG
    what = "the weights the swarm agreed on" if res.weights == "agreed" else "this node's local weights"
    print(f"exported {what} at step {res.step} to {res.out} ({'Hugging Face directory' if res.kind == 'hf' else 'safetensors + config.json'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from swarm_node.lab.demo import DemoOptions, run_compare, run_demo

    extra = list(args.node_args or [])
    if extra[:1] == ["--"]:  # argparse keeps the separator in a REMAINDER argument
        extra = extra[1:]
    opts = DemoOptions(peers=args.peers, strategy=args.strategy, steps=args.steps, run_id=args.run_id,
                       workdir=args.workdir, compare_solo=args.compare_solo, model=args.model, data=args.data,
                       extra=extra)
    if args.compare is None:
        return run_demo(opts)
    from swarm_node.strategies import registry

    names = args.compare or [n for n in registry.available() if n != registry.BASELINE_STRATEGY]
    unknown = [n for n in names if n not in registry.available()]
    if unknown:
        print(f"swarm-node demo: unknown strateg{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
              f"available: {', '.join(registry.available())}", file=sys.stderr)
        return EXIT_CONFIG
    return run_compare(opts, names)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from swarm_node.lab.simulate import simulate

    extra = list(args.node_args or [])
    if extra[:1] == ["--"]:  # argparse keeps the separator in a REMAINDER argument
        extra = extra[1:]
    return simulate(args, extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm-node", description="Pool spare GPUs (or CPUs) to train one model "
                                "over a peer-to-peer swarm.")
    p.add_argument("--version", action="version", version=f"swarm-node {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    # allow_abbrev=False: a misspelt flag (--shutdown-grace) must fail, not match a longer one
    join = sub.add_parser("join", help="run a node: start a new swarm or join one", allow_abbrev=False)
    _add_config_flags(join)
    join.set_defaults(fn=_cmd_join)

    check = sub.add_parser("check", help="preflight checks before joining", allow_abbrev=False)
    _add_config_flags(check)
    check.add_argument("--json", action="store_true")
    check.set_defaults(fn=_cmd_check)

    for name, help_text in (("status", "show this node's status"), ("peers", "list the peers this node sees"),
                            ("drain", "ask the node to finish its step and leave")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="state dir of the node to ask")
        c.add_argument("--control-addr", default=None, help="host:port of the node's control API")
        c.add_argument("--json", action="store_true")
        c.add_argument("--wide", action="store_true", help="show full peer ids")
        if name == "drain":
            c.add_argument("--reason", default="swarm-node drain")
            c.add_argument("--at-step", type=_non_negative_int, default=0, metavar="N",
                           help="keep training and drain on reaching step N (0 = now); sync and gradcode "
                                "peers told the same N stop together, on one replica. A node already past N "
                                "refuses (exit 75) and keeps training")
        c.set_defaults(fn=_cmd_status)

    strat = sub.add_parser("strategies", help="list installed strategies")
    strat.set_defaults(fn=_cmd_strategies)

    ident = sub.add_parser("identity", help="show (creating if needed) the node's peer id")
    ident.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    ident.set_defaults(fn=_cmd_identity)

    exp = sub.add_parser("export", help="write the trained model as files other tools load (HF directory or safetensors)")
    exp.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    exp.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    exp.add_argument("--weights", choices=("auto", "theta"), default="auto",
                     help="auto: the weights the swarm agreed on where the strategy keeps them (φ), else local; "
                          "theta: this node's local weights")
    exp.set_defaults(fn=_cmd_export)

    demo = sub.add_parser("demo", help="run a small local swarm of real node processes and summarise it")
    demo.add_argument("--peers", type=int, default=3)
    demo.add_argument("--strategy", default=DEFAULT_STRATEGY)
    demo.add_argument("--steps", type=int, default=None, help="steps of every node (default: the strategy's demo "
                      "profile; a few hundred)")
    demo.add_argument("--compare", nargs="*", metavar="STRATEGY", default=None,
                      help="run the demo of each strategy named (none named: every installed one) one after the "
                           "other, and print one table of their verdicts")
    demo.add_argument("--run-id", default="demo")
    demo.add_argument("--model", default="builtin",
                      help="every peer's model: builtin, a local Hugging Face directory, or package.module:function")
    demo.add_argument("--data", type=Path, default=None, help="every peer's training text or token shards")
    demo.add_argument("--workdir", type=Path, default=None, help="keep node state here (default: a temp dir)")
    demo.add_argument("--compare-solo", action=argparse.BooleanOptionalAction, default=True,
                      help="also run the strategy's baseline node (training alone, or sharing nothing) for the "
                           "same steps and judge the swarm against it")
    demo.add_argument("node_args", nargs=argparse.REMAINDER, help="after --: extra flags for every node")
    demo.set_defaults(fn=_cmd_demo)

    sim = sub.add_parser("simulate", help="run a churn scenario against a swarm of real nodes and judge it")
    sim.add_argument("--strategy", default=DEFAULT_STRATEGY)
    sim.add_argument("--peers", type=int, default=4)
    sim.add_argument("--scenario", default="churn", help="a scenario file, or a built-in name (see --list)")
    sim.add_argument("--list", action="store_true", help="list the built-in scenarios of --strategy and exit")
    sim.add_argument("--netns", action="store_true", help="one network namespace per node (root); "
                     "default: loopback, where partition/loss/shape/delay are skipped with a warning")
    sim.add_argument("--strict", action="store_true", help="refuse events the backend cannot do instead of skipping")
    sim.add_argument("--duration-s", type=float, default=0.0, help="stop this long after training starts")
    sim.add_argument("--max-steps", type=int, default=None, help="steps per node (default: the strategy's profile)")
    sim.add_argument("--settle-s", type=float, default=15.0,
                     help="keep training this long after the last event before the run is judged")
    sim.add_argument("--workdir", type=Path, default=None, help="keep node state here (default: a temp dir)")
    sim.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    sim.add_argument("node_args", nargs=argparse.REMAINDER, help="after --: extra flags for every node")
    sim.set_defaults(fn=_cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"swarm-node: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except LookupError as e:  # the config validates the name; this is a plugin whose target is not a Strategy
        from swarm_node.strategies.registry import UnknownStrategy

        if not isinstance(e, UnknownStrategy):
            raise
        print(f"swarm-node: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
