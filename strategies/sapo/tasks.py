"""Verifiable tasks for SAPO: (task name, seed, index) -> question and truth, plus a verifier.

Invariants:
- `make_item(task, seed, index)` is a pure function: every peer regenerates the same
  question and truth from the same triple, so a receiver never has to trust a sender's
  answer (it recomputes the truth and checks that the question matches).
- `score(item, completion)` depends only on its arguments and returns a reward in
  [0, 1]: 1 for a correct answer, `format_reward` for a well-formed but wrong one, else 0.
- Built-in family: small integer arithmetic written compactly ("3+4=") so that a byte-level
  model of ~100k parameters learns it on a CPU. Names are `<op><K>` with op in add/sub/mul
  and operands drawn uniformly from [0, K] (`add4`: 25 questions, chance about 1/9).
- Optional family: `rg:<dataset>` (reasoning-gym, if installed). Its items are regenerated
  from the same triple and scored with reasoning-gym's own scorer.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPS = {"add": "+", "sub": "-", "mul": "*"}
BUILTIN_RE = re.compile(r"^(add|sub|mul)([1-9][0-9]?)$")  # K in 1..99: questions stay short
ANSWER_RE = re.compile(r"^-?[0-9]{1,6}$")
MAX_INDEX = 2**31 - 1
RG_PREFIX = "rg:"


class TaskError(ValueError):
    """An unknown task name or an out-of-range seed/index."""


@dataclass(frozen=True, slots=True)
class TaskItem:
    task: str
    seed: int
    index: int
    question: str
    truth: str


def is_known_task(task: str) -> bool:
    return bool(BUILTIN_RE.match(task)) or (task.startswith(RG_PREFIX) and reasoning_gym_available())


def parse_task_list(spec: str) -> tuple[str, ...]:
    """'add4,mul5' -> ('add4', 'mul5'); raises TaskError naming the first unknown task."""
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not names:
        raise TaskError("no task given (e.g. 'add4')")
    for t in names:
        if not is_known_task(t):
            hint = " (reasoning-gym is not installed: pip install 'swarm-node[rl]')" if t.startswith(RG_PREFIX) else ""
            raise TaskError(f"unknown task {t!r}: use add<K>, sub<K> or mul<K> with K in 1..99, or rg:<dataset>{hint}")
    return names


def max_prompt_chars(task: str) -> int | None:
    """Longest question a built-in task can produce (None: not known in advance)."""
    m = BUILTIN_RE.match(task)
    return 2 * len(m.group(2)) + 2 if m else None


def make_item(task: str, seed: int, index: int) -> TaskItem:
    if type(seed) is not int or type(index) is not int or not 0 <= seed <= MAX_INDEX or not 0 <= index <= MAX_INDEX:
        raise TaskError(f"seed and index must be ints in [0, {MAX_INDEX}]")
    m = BUILTIN_RE.match(task)
    if m:
        op, k = m.group(1), int(m.group(2))
        # A str seed goes through sha512 inside `random`: the same on every machine and run.
        rng = random.Random(f"{task}:{seed}:{index}")
        a, b = rng.randint(0, k), rng.randint(0, k)
        truth = {"add": a + b, "sub": a - b, "mul": a * b}[op]
        return TaskItem(task, seed, index, f"{a}{OPS[op]}{b}=", str(truth))
    if task.startswith(RG_PREFIX):
        return _rg_item(task, seed, index)
    raise TaskError(f"unknown task {task!r}")


def score(item: TaskItem, completion: str, *, format_reward: float = 0.0) -> float:
    """Reward of one completion against `item`'s truth (regenerate the item first: never
    score against a truth that came over the network)."""
    if item.task.startswith(RG_PREFIX):
        return _rg_score(item, completion)
    answer = completion.strip()
    if not ANSWER_RE.match(answer):
        return 0.0
    return 1.0 if int(answer) == int(item.truth) else format_reward


# ---- reasoning-gym (optional) ------------------------------------------------------
def reasoning_gym_available() -> bool:
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        return False
    return True


_RG_CACHE: dict[tuple[str, int, int], tuple[str, dict]] = {}


def _rg_entry(task: str, seed: int, index: int) -> tuple[str, dict]:
    key = (task, seed, index)
    if key not in _RG_CACHE:
        import reasoning_gym

        ds = reasoning_gym.create_dataset(task[len(RG_PREFIX):], seed=seed, size=index + 1)
        entry = ds[index]
        _RG_CACHE[key] = (str(entry["question"]), entry)
        if len(_RG_CACHE) > 4096:  # bounded: a long run must not grow memory
            _RG_CACHE.pop(next(iter(_RG_CACHE)))
    return _RG_CACHE[key]


def _rg_item(task: str, seed: int, index: int) -> TaskItem:
    question, entry = _rg_entry(task, seed, index)
    return TaskItem(task, seed, index, question, str(entry["answer"]))


def _rg_score(item: TaskItem, completion: str) -> float:
    import reasoning_gym

    _, entry = _rg_entry(item.task, item.seed, item.index)
    fn = reasoning_gym.get_score_answer_fn(item.task[len(RG_PREFIX):])
    return min(1.0, max(0.0, float(fn(completion.strip(), entry))))
