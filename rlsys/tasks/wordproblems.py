"""The ``word_problems`` task: short English word problems with small integer answers.

    "Ivan has 4 marbles. He buys 3 more. How many marbles does Ivan have now?" -> "7"

Templates add (buy, find, receive, combine two people) or take away (lose, give away, compare
two people) two operands in ``0..MAX_OPERAND``; answers lie in ``0..2 * MAX_OPERAND`` and are
never negative (a take-away draws its second operand no larger than the first). Names (each
with its pronoun) and objects (singular and plural) are drawn from fixed lists, so the
surface varies a lot while the arithmetic stays small enough for a ~1M-parameter model (the
``chat_tiny`` experiment, whose chat model answers ``\\boxed{7}``). The answer is the bare
number as a string.

Same contract as the arithmetic generators (:func:`rlsys.tasks.arithmetic.load_task`, which
calls :func:`generate_splits` for ``task.name=word_problems`` and wraps the rows in
``Example``/``TaskData``; this module imports nothing from it, to keep the import graph acyclic):
deterministic for a given ``seed``, ``num_train``, ``num_val`` and ``num_eval`` (``task.digits``
and the counting fields are ignored), splits pairwise disjoint by prompt, eval drawn first so
that it does not depend on how much training data is drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["MAX_OPERAND", "NAMES", "OBJECTS", "TEMPLATES", "Row", "generate_splits", "num_distinct_problems", "render"]

Row = tuple[str, str, str]
"""``(id, prompt, answer)`` of one problem."""

MAX_OPERAND = 20
"""Operands are drawn from ``0..MAX_OPERAND``; answers lie in ``0..2 * MAX_OPERAND``."""

NAMES: tuple[tuple[str, str], ...] = (
    ("Ivan", "he"),
    ("Maria", "she"),
    ("Tom", "he"),
    ("Anna", "she"),
    ("Sam", "he"),
    ("Lily", "she"),
    ("Omar", "he"),
    ("Emma", "she"),
    ("Ben", "he"),
    ("Sofia", "she"),
    ("Leo", "he"),
    ("Mia", "she"),
    ("Jack", "he"),
    ("Nora", "she"),
    ("Ravi", "he"),
    ("Zoe", "she"),
    ("Luca", "he"),
    ("Grace", "she"),
    ("Noah", "he"),
    ("Ella", "she"),
    ("Hugo", "he"),
    ("Ava", "she"),
    ("Kenji", "he"),
    ("Chloe", "she"),
    ("Max", "he"),
    ("Ruby", "she"),
    ("Felix", "he"),
    ("Hana", "she"),
    ("Oscar", "he"),
    ("Lucy", "she"),
    ("Daniel", "he"),
    ("Sara", "she"),
)
"""First names with their subject pronoun."""

OBJECTS: tuple[tuple[str, str], ...] = (
    ("marble", "marbles"),
    ("apple", "apples"),
    ("book", "books"),
    ("pencil", "pencils"),
    ("sticker", "stickers"),
    ("coin", "coins"),
    ("cookie", "cookies"),
    ("card", "cards"),
    ("shell", "shells"),
    ("stamp", "stamps"),
    ("balloon", "balloons"),
    ("orange", "oranges"),
    ("crayon", "crayons"),
    ("button", "buttons"),
    ("candy", "candies"),
    ("cherry", "cherries"),
    ("box", "boxes"),
    ("peach", "peaches"),
    ("feather", "feathers"),
    ("ribbon", "ribbons"),
    ("rock", "rocks"),
    ("flower", "flowers"),
    ("egg", "eggs"),
    ("cup", "cups"),
    ("hat", "hats"),
    ("kite", "kites"),
    ("grape", "grapes"),
    ("ball", "balls"),
    ("puzzle", "puzzles"),
    ("toy car", "toy cars"),
)
"""Countable objects, singular and plural."""


@dataclass(frozen=True)
class _Template:
    name: str
    text: str
    """``str.format`` fields: A/B (names), P (A's pronoun, capitalised), O (A's object pronoun),
    a/b (operands), x/y (the object after a and after b), objs (plural)."""
    subtract: bool
    """Answer ``a - b`` (with ``b <= a``) instead of ``a + b``."""
    two_people: bool


TEMPLATES: tuple[_Template, ...] = (
    _Template("buy", "{A} has {a} {x}. {P} buys {b} more. How many {objs} does {A} have now?", False, False),
    _Template("find", "{A} had {a} {x}. Then {p} found {b} more. How many {objs} does {A} have now?", False, False),
    _Template("receive", "{A} has {a} {x}. {B} gives {O} {b} more. How many {objs} does {A} have now?", False, True),
    _Template("combine", "{A} has {a} {x} and {B} has {b} {y}. How many {objs} do they have together?", False, True),
    _Template("lose", "{A} has {a} {x}. {P} loses {b} of them. How many {objs} does {A} have left?", True, False),
    _Template("give", "{A} has {a} {x}. {P} gives {b} to {B}. How many {objs} does {A} have left?", True, True),
    _Template("compare", "{A} has {a} {x}. {B} has {b} {y}. How many more {objs} does {A} have than {B}?", True, True),
)
"""The problem templates (add: buy, find, receive, combine; take away: lose, give, compare)."""

_OBJECT_PRONOUN = {"he": "him", "she": "her"}


def num_distinct_problems() -> int:
    """How many different prompts the templates can produce (the cap on train + val + eval)."""
    pairs_add = (MAX_OPERAND + 1) ** 2
    pairs_sub = (MAX_OPERAND + 1) * (MAX_OPERAND + 2) // 2
    n_names = len(NAMES)
    total = 0
    for t in TEMPLATES:
        people = n_names * (n_names - 1) if t.two_people else n_names
        total += people * len(OBJECTS) * (pairs_sub if t.subtract else pairs_add)
    return total


def render(template: _Template, a: int, b: int, name: tuple[str, str], other: str, obj: tuple[str, str]) -> str:
    """The prompt of one problem (``other`` is ignored by one-person templates)."""
    singular, plural = obj
    return template.text.format(
        A=name[0],
        B=other,
        P=name[1].capitalize(),
        p=name[1],
        O=_OBJECT_PRONOUN[name[1]],
        a=a,
        b=b,
        x=singular if a == 1 else plural,
        y=singular if b == 1 else plural,
        objs=plural,
    )


def generate_splits(
    seed: int, num_train: int, num_val: int, num_eval: int, name: str = "word_problems"
) -> tuple[list[Row], list[Row], list[Row]]:
    """The (train, val, eval) rows, ids ``{name}-{split}-{i}`` (see the module docstring)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def one() -> tuple[str, str]:
        template = rng.choice(TEMPLATES)
        person = rng.choice(NAMES)
        other = rng.choice([n for n, _ in NAMES if n != person[0]])
        obj = rng.choice(OBJECTS)
        a = rng.randint(0, MAX_OPERAND)
        b = rng.randint(0, a) if template.subtract else rng.randint(0, MAX_OPERAND)
        answer = a - b if template.subtract else a + b
        return render(template, a, b, person, other, obj), str(answer)

    def draw(split: str, count: int) -> list[Row]:
        rows: list[Row] = []
        while len(rows) < count:
            prompt, answer = one()
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append((f"{name}-{split}-{len(rows)}", prompt, answer))
        return rows

    eval_rows = draw("eval", num_eval)
    val_rows = draw("val", num_val)
    train_rows = draw("train", num_train)
    return train_rows, val_rows, eval_rows
