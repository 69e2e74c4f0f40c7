"""Logging setup: one stdlib pipeline for swarm-node, hivemind and everything else.

`configure_logging(fmt, level)`:
- `fmt="console"`: `HH:MM:SS LEVEL logger: message key=value…` on stderr, one line per
  record (never wrapped); `"json"`: one JSON object per line with `ts` (UTC ISO-8601),
  `level`, `logger`, `msg`, any `extra=` fields and `exc`; `"auto"`: console on a TTY, else JSON.
- hivemind's own handler is switched to "nowhere" so its records reach our root handler
  exactly once, re-levelled to WARNING unless `level` is DEBUG (or stricter than WARNING,
  which then applies to hivemind too). Never silence it: a muted hivemind turns partitions
  into silent hangs.
- Idempotent: calling again replaces our handler instead of adding a second one.
- Raises `ValueError` for an unknown `fmt` or `level`.

Switching hivemind's handler imports hivemind (≈3 s, torch included); light CLI commands that
never import it pass `adopt_hivemind=False`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

LogFormat = Literal["auto", "console", "json"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
# hivemind's formatter hints (colour codes, caller) are presentation, not data.
_IGNORED_EXTRAS = frozenset({"origin_created", "caller", "caller_block", "levelcolor", "bold", "reset"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values that JSON cannot encode are written with `str()`."""

    def format(self, record: logging.LogRecord) -> str:
        created = getattr(record, "origin_created", record.created)  # hivemind forwards child-process times
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """Short human lines; `extra=` fields are appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            first, sep, rest = line.partition("\n")  # keep tracebacks below the fields
            line = first + " " + " ".join(f"{k}={v}" for k, v in extras.items()) + sep + rest
        return line


class _SwarmHandler(logging.StreamHandler):
    """Marks the handler we installed, so reconfiguring replaces it."""


def configure_logging(fmt: LogFormat = "auto", level: str = "INFO", *, adopt_hivemind: bool = True) -> None:
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt not in ("console", "json"):
        raise ValueError(f"unknown log format {fmt!r} (auto, console or json)")

    handler = _SwarmHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter() if fmt == "console" else JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _SwarmHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)

    if adopt_hivemind:
        _adopt_hivemind()
    # Set after adopting: hivemind resets its logger's level when its handler is removed.
    logging.getLogger("hivemind").setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))


def _adopt_hivemind() -> None:
    try:
        from hivemind.utils.logging import use_hivemind_log_handler
    except ImportError:  # hivemind absent: its logger, if ever used, already propagates to root
        return
    use_hivemind_log_handler("nowhere")  # removes its handler and sets propagate=True


def _extras(record: logging.LogRecord) -> dict:
    return {
        k: v for k, v in vars(record).items()
        if k not in _STANDARD_ATTRS and k not in _IGNORED_EXTRAS and not k.startswith("_")
    }
