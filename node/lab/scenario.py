"""Churn scenarios: a tiny language of timed events, parsed from text or built in Python.

    at <seconds>[s] <action> <target> [arg]      # seconds after the swarm started training
    at step <N>     <action> <target> [arg]      # once the highest step of a live node reaches N

Actions (targets are node names: initial peers n0..n{peers-1}; `join` names a new one):
kill (SIGKILL the process group), term (SIGTERM: graceful drain, must exit 0), pause/resume
(SIGSTOP/SIGCONT), restart (same --state-dir; SIGTERM first if running), join (a new node),
partition/heal (drop all traffic / undo), `loss n1 20%` (incoming packets; 0 removes),
`shape n1 10mbit` (egress cap; off removes), `delay n1 50ms` (needs netem, else skipped).
`#` starts a comment; blank lines are ignored. A parsed `Scenario` holds only well-formed
events (known action, valid argument, non-negative trigger); a bad line raises `ScenarioError`
naming its line number. Events run in the order written, each waiting for its trigger after
the previous one fired, so `kill n1` then `restart n1` never swap. `Scenario.check_targets`
checks targets against the swarm.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# action -> how many arguments after the target
ACTIONS: dict[str, int] = {
    "kill": 0, "term": 0, "pause": 0, "resume": 0, "restart": 0, "join": 0,
    "partition": 0, "heal": 0, "loss": 1, "shape": 1, "delay": 1,
}
# Actions that change the network rather than a process: only a network lab can do them.
NETWORK_ACTIONS = frozenset({"partition", "heal", "loss", "shape", "delay"})

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,11}$")
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$")
_DELAY = re.compile(r"^(\d+(\.\d+)?)ms$")
_SECONDS = re.compile(r"^(\d+(\.\d+)?)s?$")


class ScenarioError(ValueError):
    """A scenario that cannot run as written; the message names the line when there is one."""


@dataclass(frozen=True)
class Event:
    """One timed event. Exactly one of `at_s` / `at_step` is set."""

    action: str
    target: str
    at_s: float | None = None
    at_step: int | None = None
    arg: str | None = None
    line: int = field(default=0, compare=False)  # 1-based line in the source text; 0 when built in Python

    def __post_init__(self) -> None:
        where = f"line {self.line}: " if self.line else ""
        if self.action not in ACTIONS:
            raise ScenarioError(f"{where}unknown action {self.action!r} (one of: {', '.join(ACTIONS)})")
        if (self.at_s is None) == (self.at_step is None):
            raise ScenarioError(f"{where}give exactly one trigger: seconds or a step")
        if self.at_s is not None and not self.at_s >= 0:
            raise ScenarioError(f"{where}time must be >= 0, got {self.at_s}")
        if self.at_step is not None and self.at_step < 0:
            raise ScenarioError(f"{where}step must be >= 0, got {self.at_step}")
        if not _NAME.match(self.target):
            raise ScenarioError(f"{where}bad node name {self.target!r} (lowercase letter, then letters, digits, _)")
        if (self.arg is None) != (ACTIONS[self.action] == 0):
            want = "no argument" if ACTIONS[self.action] == 0 else "one argument"
            raise ScenarioError(f"{where}{self.action} takes {want}")
        if self.action == "loss":
            object.__setattr__(self, "arg", str(loss_percent(self.arg, where)))
        elif self.action == "shape" and self.arg != "off" and not _RATE.match(self.arg):
            raise ScenarioError(f"{where}bad rate {self.arg!r} (e.g. 10mbit, 500kbit, or off)")
        elif self.action == "delay" and self.arg != "off" and not _DELAY.match(self.arg):
            raise ScenarioError(f"{where}bad delay {self.arg!r} (e.g. 50ms, or off)")

    @property
    def is_network(self) -> bool:
        return self.action in NETWORK_ACTIONS

    def describe(self) -> str:
        when = f"at {self.at_s:g}s" if self.at_s is not None else f"at step {self.at_step}"
        return f"{when} {self.action} {self.target}" + (f" {self.arg}" if self.arg is not None else "")


def loss_percent(text: str, where: str = "") -> int:
    m = re.match(r"^(\d+)%?$", text)
    if not m or not 0 <= int(m.group(1)) <= 100:
        raise ScenarioError(f"{where}bad loss {text!r} (a percentage 0-100, e.g. 20%)")
    return int(m.group(1))


def at(seconds: float, action: str, target: str, arg: str | None = None) -> Event:
    """Python form of `at <seconds> <action> <target> [arg]`."""
    return Event(action, target, at_s=float(seconds), arg=arg)


def at_step(step: int, action: str, target: str, arg: str | None = None) -> Event:
    """Python form of `at step <N> <action> <target> [arg]`."""
    return Event(action, target, at_step=int(step), arg=arg)


@dataclass(frozen=True)
class Scenario:
    events: tuple[Event, ...]
    name: str = "scenario"
    source: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str, name: str = "scenario") -> "Scenario":
        events = []
        for no, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if line:
                events.append(_parse_line(line, no))
        return cls(tuple(events), name=name, source=text)

    @classmethod
    def from_file(cls, path: Path) -> "Scenario":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ScenarioError(f"cannot read scenario file {path}: {e.strerror}") from None
        try:
            return cls.parse(text, name=Path(path).name)
        except ScenarioError as e:
            raise ScenarioError(f"{path}: {e}") from None

    def network_events(self) -> list[Event]:
        return [e for e in self.events if e.is_network]

    def check_targets(self, initial: list[str]) -> None:
        """Walk the events in order, tracking which nodes exist and run; raise on the first
        event that names an unknown node, joins an existing name, or resumes a running one."""
        known, running, paused = set(initial), set(initial), set()
        for e in self.events:
            where = f"line {e.line}: " if e.line else f"event {e.describe()!r}: "
            if e.action == "join":
                if e.target in known:
                    raise ScenarioError(f"{where}join {e.target}: that name is taken (join a new name)")
                known.add(e.target)
                running.add(e.target)
                continue
            if e.target not in known:
                raise ScenarioError(f"{where}unknown node {e.target!r} (nodes: {', '.join(sorted(known))})")
            if e.action in ("kill", "term"):
                running.discard(e.target)
                paused.discard(e.target)
            elif e.action == "restart":
                running.add(e.target)
                paused.discard(e.target)
            elif e.action == "pause":
                paused.add(e.target)
            elif e.action == "resume":
                if e.target not in paused:
                    raise ScenarioError(f"{where}resume {e.target}: it is not paused")
                paused.discard(e.target)


def _parse_line(line: str, no: int) -> Event:
    words = line.split()
    where = f"line {no}: "
    if words[0] != "at" or len(words) < 3:
        raise ScenarioError(f"{where}expected `at <seconds>|step <N> <action> <node> [arg]`, got {line!r}")
    if words[1] == "step":
        if len(words) < 4 or not words[2].isdigit():
            raise ScenarioError(f"{where}`at step` needs a whole step number, got {line!r}")
        trigger, rest = {"at_step": int(words[2])}, words[3:]
    else:
        m = _SECONDS.match(words[1])
        if not m:
            raise ScenarioError(f"{where}bad time {words[1]!r} (seconds like 12 or 12.5s, or `step N`)")
        trigger, rest = {"at_s": float(m.group(1))}, words[2:]
    if len(rest) < 2:
        raise ScenarioError(f"{where}expected an action and a node after the trigger, got {line!r}")
    action, target, args = rest[0], rest[1], rest[2:]
    if action not in ACTIONS:
        raise ScenarioError(f"{where}unknown action {action!r} (one of: {', '.join(ACTIONS)})")
    if len(args) != ACTIONS[action]:
        want = "no argument" if ACTIONS[action] == 0 else "one argument"
        raise ScenarioError(f"{where}{action} takes {want}, got {len(args)}: {line!r}")
    return Event(action, target, arg=args[0] if args else None, line=no, **trigger)
