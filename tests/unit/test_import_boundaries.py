"""Import boundaries between the daemon, the wire layer and the strategies, read from the ASTs.

- Strategies never import hivemind or the generated protobuf modules (`protocol/pb`): they reach
  the network through `protocol` (messages, clock, transport, codec, records), and the DHT
  only through the context's record store (never `membership.net`).
- A strategy never imports another strategy's modules: a family package (lowcomm, swarm, sapo,
  gradcode) imports only itself and the shared modules at the top of `strategies/`; only the
  registry names every strategy.
- Only the trainer assigns its step counter; others call `align_step`. Progress's step is read
  from the strategy, never assigned.
- The strategy context is narrow: no field of it is the node's config, membership or trainer
  class, and no strategy reaches for `ctx.config` or `ctx.membership`.
- `node/` never names a strategy: it imports only the strategy interface (base, options,
  registry) and holds no string equal to a built-in strategy's name outside docstrings.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "swarm_node"
FAMILIES = ("lowcomm", "swarm", "sapo", "gradcode")
SHARED = ("base", "churn_profile", "context", "demo_profile", "data_parallel", "leader", "options", "page_panel", "quorum")
NODE_MAY_IMPORT = ("base", "churn_profile", "demo_profile", "options", "registry")


def _modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "pb" not in p.relative_to(ROOT).parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = [PKG, *path.relative_to(ROOT).with_suffix("").parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # `from x import module`
    return out


def _where(path: Path, line: int, what: str) -> str:
    return f"{path.relative_to(ROOT)}:{line}: {what}"


def _strategy_part(dotted: str) -> str | None:
    """The first name under swarm_node.strategies (a family or a shared module), if any."""
    parts = dotted.split(".")
    return parts[2] if parts[:2] == [PKG, "strategies"] and len(parts) > 2 else None


def test_strategies_reach_the_network_only_through_protocol():
    bad = [_where(p, line, mod) for p in _modules("strategies") for line, mod in _imports(p)
           if mod.split(".")[0] == "hivemind" or mod.startswith(f"{PKG}.protocol.pb")]
    assert not bad, "strategies import hivemind or generated code directly:\n" + "\n".join(bad)


def test_strategies_reach_the_dht_only_through_the_record_store():
    bad = []
    for p in _modules("strategies"):
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Attribute) and node.attr == "net" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "membership":
                bad.append(_where(p, node.lineno, "membership.net"))
    assert not bad, "strategies touch the raw DHT:\n" + "\n".join(bad)


def test_only_the_trainer_assigns_its_step_counter():
    """Strategies and the daemon move it through `align_step` (or by applying gradients)."""
    bad = []
    for p in [*_modules("strategies"), *_modules("node"), *_modules("protocol")]:
        if p == ROOT / "node" / "train" / "trainer.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "step" and (
                        (isinstance(t.value, ast.Attribute) and t.value.attr == "trainer")
                        or (isinstance(t.value, ast.Name) and t.value.id == "trainer")):
                    bad.append(_where(p, node.lineno, "assigns trainer.step"))
    assert not bad, "only the trainer moves its step counter:\n" + "\n".join(bad)


NODE_CLASSES = {"NodeConfig", "Membership", "LocalTrainer", "SwarmDaemon", "SwarmNetwork"}


def test_the_strategy_context_exposes_no_node_internals():
    path = ROOT / "strategies" / "context.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    ctx_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StrategyContext")
    fields = {n.target.id: ast.unparse(n.annotation) for n in ctx_class.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert {"node", "options", "peers", "trainer", "transport", "records", "clock", "compute", "metrics",
            "progress"} <= set(fields), fields
    bad = [f"{name}: {ann}" for name, ann in fields.items() if any(c in ann for c in NODE_CLASSES)]
    assert not bad, "the strategy context carries node internals: " + ", ".join(bad)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not names & NODE_CLASSES, f"context.py names {names & NODE_CLASSES}"
    bad = []
    for p in [*_modules("strategies"), *_modules("protocol")]:
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Attribute) and node.attr in ("config", "membership") and (
                    (isinstance(node.value, ast.Name) and node.value.id == "ctx")
                    or (isinstance(node.value, ast.Attribute) and node.value.attr == "ctx")):
                bad.append(_where(p, node.lineno, f"ctx.{node.attr}"))
    assert not bad, "strategies reach past the narrow context:\n" + "\n".join(bad)


def test_nothing_assigns_the_progress_step():
    """Progress follows the strategy's `current_step`; it is never written."""
    bad = []
    for p in [*_modules("strategies"), *_modules("node"), *_modules("protocol")]:
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            bad += [_where(p, node.lineno, "assigns progress.step") for t in targets
                    if isinstance(t, ast.Attribute) and t.attr == "step" and isinstance(t.value, ast.Attribute)
                    and t.value.attr == "progress"]
    assert not bad, "\n".join(bad)


def test_strategies_do_not_import_each_others_modules():
    bad = []
    for p in _modules("strategies"):
        rel = p.relative_to(ROOT / "strategies").with_suffix("").parts
        if rel == ("registry",):
            continue
        own = rel[0] if len(rel) > 1 else None  # the family this module belongs to
        for line, mod in _imports(p):
            part = _strategy_part(mod)
            if part is not None and part not in SHARED and part != own:
                bad.append(_where(p, line, mod))
    assert not bad, "a strategy imports another strategy's modules:\n" + "\n".join(sorted(set(bad)))


def _builtin_names() -> set[str]:
    from swarm_node.strategies.registry import BUILTIN

    return set(BUILTIN)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_node_never_names_a_strategy():
    names = _builtin_names()
    assert {"sync", "diloco", "sapo"} <= names  # the check below means something
    bad = []
    for p in _modules("node"):
        for line, mod in _imports(p):
            part = _strategy_part(mod)
            if part is not None and part not in NODE_MAY_IMPORT:
                bad.append(_where(p, line, f"imports {mod}"))
        tree = ast.parse(p.read_text())
        docs = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and node.value in names:
                bad.append(_where(p, node.lineno, f"names the strategy {node.value!r}"))
    assert not bad, "node/ names a strategy:\n" + "\n".join(bad)
