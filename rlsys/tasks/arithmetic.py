"""The built-in verifiable task (integer addition) and loading of task data sets.

A task is a list of :class:`Example` rows (``id``, ``prompt``, ``answer``) split three ways:

* ``train`` -- prompts the RL loop (and the supervised warm start) draws from;
* ``val``   -- used only by the warm start of the tiny model to decide when to stop;
* ``eval``  -- held out; the accuracy reported for a policy.

Invariant: the three splits are pairwise disjoint by prompt, and for a given
:class:`TaskConfig` they are the same on every machine and every run.

Rows come from a built-in generator or from a JSONL file (``TaskConfig.data_path``). The
built-in generators:

* ``addition`` -- ``"123+45="`` -> ``"168"``: answers of a few tokens (the tiny experiment);
* ``counting`` -- ``"57+3="`` -> ``"58+2=59+1=60+0"``: add ``b`` by counting, one step per
  term, until the second operand reaches 0; the last term holds the sum. A long scratchpad
  (``count_min..count_max`` terms of up to 8 tokens each) for a short prompt, so generation
  dominates a step (the generation-heavy benchmark). Every step is local (increment one
  number, decrement the other), so a small model learns the format quickly and RL improves
  how reliably it carries it through to the end.

JSONL rows are::

    {"id": "a1", "prompt": "12+7=", "answer": "19", "split": "train"}

A reward is :func:`verify_answer`: 1.0 when the stripped completion equals the answer (the
``exact_match`` reward does the same); :func:`scratchpad_credit` gives partial credit per correct
leading term of a scratchpad (``reward.function=scratchpad_credit``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = [
    "ALPHABET",
    "DatasetError",
    "Example",
    "TaskConfig",
    "TaskData",
    "load_task",
    "counting_answer",
    "scratchpad_credit",
    "verify_answer",
]

ALPHABET = "0123456789+="
"""Characters a prompt or answer may contain: the tiny model's tokenizer has one token each."""

MAX_DIGITS = 6
_SPLITS = ("train", "eval")
_BUILTIN_TASKS = ("addition", "counting", "word_problems")


class DatasetError(ValueError):
    """A task data file is malformed; the message names the file, the line and the problem."""


@dataclass
class TaskConfig:
    """Which task to train and evaluate on, and how its splits are drawn."""

    name: str = "addition"
    """Task name: a built-in generator (``"addition"`` or ``"counting"``); with ``data_path`` a label."""
    digits: int = 3
    """Operands are drawn uniformly from ``[0, 10**digits)`` (1..6); for ``counting`` only the
    first one (the second is the number of counting steps)."""
    count_min: int = 24
    """``counting`` only: fewest counting steps (the second operand), >= 1."""
    count_max: int = 32
    """``counting`` only: most counting steps; answers grow by up to ``digits + 5`` tokens a step."""
    num_train: int = 20000
    """Number of generated training prompts (ignored with ``data_path``)."""
    num_eval: int = 200
    """Number of generated held-out evaluation prompts (ignored with ``data_path``)."""
    num_val: int = 200
    """Validation prompts, used only by the warm start; disjoint from eval. With ``data_path``
    they are carved from the file's train rows: ``min(num_val, len(train_rows) // 2)`` of them."""
    seed: int = 1234
    """Seed of the generator and of the train/val split; same seed, same splits."""
    data_path: Optional[str] = None
    """JSONL file of ``{"id", "prompt", "answer", "split"}`` rows (split: ``"train"`` or
    ``"eval"``) used instead of the generator; ``~`` is expanded."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task.name must be a non-empty string, got {self.name!r}")
        if self.data_path is None and self.name not in _BUILTIN_TASKS:
            raise ValueError(
                f"task.name must be one of {list(_BUILTIN_TASKS)} (the built-in tasks) "
                f"unless task.data_path is set, got {self.name!r}"
            )
        if not 1 <= self.digits <= MAX_DIGITS:
            raise ValueError(f"task.digits must be in 1..{MAX_DIGITS}, got {self.digits}")
        if self.num_train < 1:
            raise ValueError(f"task.num_train must be >= 1, got {self.num_train}")
        if self.num_eval < 1:
            raise ValueError(f"task.num_eval must be >= 1, got {self.num_eval}")
        if self.num_val < 1:
            raise ValueError(f"task.num_val must be >= 1, got {self.num_val}")
        if not 1 <= self.count_min <= self.count_max:
            raise ValueError(
                f"task.count_min and task.count_max must satisfy 1 <= count_min <= count_max, "
                f"got {self.count_min} and {self.count_max}"
            )
        if self.data_path is None:
            total = self.num_train + self.num_val + self.num_eval
            if self.name == "word_problems":
                from rlsys.tasks.wordproblems import num_distinct_problems

                distinct = num_distinct_problems()
            else:
                distinct = 10**self.digits * (
                    10**self.digits if self.name == "addition" else self.count_max - self.count_min + 1
                )
            if total > distinct:
                raise ValueError(
                    f"task.num_train + task.num_val + task.num_eval = {total} exceeds the "
                    f"{distinct} distinct problems with task.digits={self.digits}; "
                    "lower the counts or raise task.digits"
                )
        elif not isinstance(self.data_path, str) or not self.data_path:
            raise ValueError(f"task.data_path must be a non-empty path, got {self.data_path!r}")


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer."""

    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskData:
    """The three splits of a task, pairwise disjoint by prompt."""

    train: list[Example]
    val: list[Example]
    eval: list[Example]


def verify_answer(completion_text: str, answer: str) -> float:
    """Reward of a completion: 1.0 if ``completion_text.strip() == answer`` else 0.0."""
    return 1.0 if completion_text.strip() == answer else 0.0


def load_task(cfg: TaskConfig) -> TaskData:
    """Generate (or read from ``cfg.data_path``) the train/val/eval splits of a task.

    Deterministic for a given config. Raises :class:`DatasetError` for a malformed file.
    """
    if cfg.data_path is not None:
        return _load_jsonl(Path(cfg.data_path).expanduser(), cfg)
    return _generate(cfg)


def counting_answer(a: int, b: int) -> str:
    """The ``counting`` scratchpad of ``a+b``: ``a+1`` and ``b-1``, ..., down to ``a+b`` and 0."""
    return "=".join(f"{a + i}+{b - i}" for i in range(1, b + 1))


def scratchpad_credit(completion_text: str, answer: str) -> float:
    """Partial credit for a ``=``-separated scratchpad (the ``counting`` task): the number of
    leading terms that match the answer's, over the longer of the two term counts. 1.0 exactly
    when the stripped completion equals the answer; extra or missing terms cost credit."""
    got, want = completion_text.strip().split("="), answer.split("=")
    right = 0
    for g, w in zip(got, want):
        if g != w:
            break
        right += 1
    return right / max(len(got), len(want))


def _generate(cfg: TaskConfig) -> TaskData:
    if cfg.name == "word_problems":
        from rlsys.tasks.wordproblems import generate_splits

        splits = generate_splits(cfg.seed, cfg.num_train, cfg.num_val, cfg.num_eval, cfg.name)
        return TaskData(*([Example(*row) for row in rows] for rows in splits))
    # Draw eval first, then val, then train, each without replacement from what is left: the
    # eval set depends only on (seed, digits, num_eval), not on how much training data is drawn.
    rng = random.Random(cfg.seed)
    bound = 10**cfg.digits
    seen: set[tuple[int, int]] = set()
    counting = cfg.name == "counting"

    def draw(split: str, count: int) -> list[Example]:
        rows = []
        while len(rows) < count:
            if counting:
                pair = (rng.randrange(bound), rng.randint(cfg.count_min, cfg.count_max))
            else:
                pair = (rng.randrange(bound), rng.randrange(bound))
            if pair in seen:
                continue
            seen.add(pair)
            a, b = pair
            answer = counting_answer(a, b) if counting else str(a + b)
            rows.append(Example(id=f"{cfg.name}-{split}-{len(rows)}", prompt=f"{a}+{b}=", answer=answer))
        return rows

    eval_rows = draw("eval", cfg.num_eval)
    val_rows = draw("val", cfg.num_val)
    train_rows = draw("train", cfg.num_train)
    return TaskData(train=train_rows, val=val_rows, eval=eval_rows)


def _load_jsonl(path: Path, cfg: TaskConfig) -> TaskData:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read task.data_path ({exc.strerror})") from exc

    splits: dict[str, list[Example]] = {s: [] for s in _SPLITS}
    first_line_of_prompt: dict[str, int] = {}
    first_line_of_id: dict[str, int] = {}
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{where}: invalid UTF-8 at byte {exc.start} of the line") from exc
        if not line.strip():
            continue
        example, split = _parse_row(line, where)
        if example.id in first_line_of_id:
            raise DatasetError(f"{where}: duplicate id {example.id!r} (first at line {first_line_of_id[example.id]})")
        if example.prompt in first_line_of_prompt:
            raise DatasetError(
                f"{where}: duplicate prompt {example.prompt!r} (first at line "
                f"{first_line_of_prompt[example.prompt]}); prompts must be unique so that "
                "the splits stay disjoint"
            )
        first_line_of_id[example.id] = lineno
        first_line_of_prompt[example.prompt] = lineno
        splits[split].append(example)

    if not first_line_of_id:
        raise DatasetError(
            f"{path}: no rows (the file is empty or all blank lines); write one JSON object per "
            'line with "id", "prompt", "answer" and "split"'
        )
    for split in _SPLITS:
        if not splits[split]:
            raise DatasetError(f'{path}: no rows with "split": "{split}"; both train and eval are needed')
    train_rows = list(splits["train"])
    if len(train_rows) < 2:
        raise DatasetError(f"{path}: needs at least 2 train rows (one is carved off for validation)")
    random.Random(cfg.seed).shuffle(train_rows)
    num_val = min(cfg.num_val, len(train_rows) // 2)
    return TaskData(train=train_rows[num_val:], val=train_rows[:num_val], eval=splits["eval"])


def _parse_row(line: str, where: str) -> tuple[Example, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {_json_type(row)}")
    for field in ("id", "prompt", "answer", "split"):
        if field not in row:
            raise DatasetError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise DatasetError(f"{where}: field {field!r} must be a string, got {_json_type(row[field])}")
    for field in ("id", "prompt", "answer"):
        if not row[field].strip():
            raise DatasetError(f"{where}: field {field!r} must not be empty or blank")
    for field in ("prompt", "answer"):
        bad = sorted(set(row[field]) - set(ALPHABET))
        if bad:
            raise DatasetError(
                f"{where}: field {field!r} has characters outside the tokenizer's alphabet "
                f"{ALPHABET!r}: {''.join(bad)!r}"
            )
    if row["split"] not in _SPLITS:
        raise DatasetError(f"{where}: field 'split' must be one of {list(_SPLITS)}, got {row['split']!r}")
    return Example(id=row["id"], prompt=row["prompt"], answer=row["answer"]), row["split"]


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if value is None:
        return "null"
    return type(value).__name__
