"""rlsys.tasks.wordproblems: the word_problems generator (format, answers, determinism, disjoint splits)."""

import re
import string

import pytest

from rlsys.tasks.arithmetic import TaskConfig, load_task
from rlsys.tasks.wordproblems import MAX_OPERAND, NAMES, OBJECTS, TEMPLATES, num_distinct_problems, render

CFG = TaskConfig(name="word_problems", num_train=3000, num_val=100, num_eval=100)


@pytest.fixture(scope="module")
def data():
    return load_task(CFG)


def _template_regex(text: str) -> re.Pattern:
    """A template's text as a regex: ``{a}``/``{b}`` capture numbers, other fields any words."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if field in ("a", "b"):
            parts.append(f"(?P<{field}>\\d+)")
        elif field is not None:
            parts.append("[A-Za-z ]+")
    return re.compile("".join(parts) + "$")


PATTERNS = [(t, _template_regex(t.text)) for t in TEMPLATES]
ONE_PLURAL = re.compile(r"\b1 (%s)\b" % "|".join(plural for _, plural in OBJECTS))
MANY_SINGULAR = re.compile(r"\b(?!1\b)\d+ (%s)\b" % "|".join(singular for singular, _ in OBJECTS))


def _solve(prompt: str) -> tuple[str, int, int, int]:
    """(template name, a, b, answer) of a prompt, by matching it against the templates."""
    matches = [(t, m) for t, p in PATTERNS if (m := p.match(prompt))]
    assert len(matches) == 1, f"{prompt!r} matches {len(matches)} templates"
    t, m = matches[0]
    a, b = int(m["a"]), int(m["b"])
    return t.name, a, b, a - b if t.subtract else a + b


def test_the_docstring_example():
    buy = next(t for t in TEMPLATES if t.name == "buy")
    text = render(buy, 4, 3, ("Ivan", "he"), "Tom", ("marble", "marbles"))
    assert text == "Ivan has 4 marbles. He buys 3 more. How many marbles does Ivan have now?"
    assert render(buy, 1, 3, ("Anna", "she"), "Tom", ("peach", "peaches")).startswith("Anna has 1 peach. She buys")


def test_sizes_ids_and_answers(data):
    assert (len(data.train), len(data.val), len(data.eval)) == (3000, 100, 100)
    rows = [*data.train, *data.val, *data.eval]
    assert len({ex.id for ex in rows}) == len(rows)
    assert data.eval[0].id == "word_problems-eval-0"
    used = set()
    for ex in rows:
        name, a, b, answer = _solve(ex.prompt)
        used.add(name)
        assert 0 <= a <= MAX_OPERAND and 0 <= b <= MAX_OPERAND
        assert ex.answer == str(answer) and 0 <= answer <= 2 * MAX_OPERAND
        assert not ONE_PLURAL.search(ex.prompt) and not MANY_SINGULAR.search(ex.prompt), ex.prompt
    assert used == {t.name for t in TEMPLATES}


def test_splits_are_pairwise_disjoint_by_prompt(data):
    train, val, ev = ({ex.prompt for ex in split} for split in (data.train, data.val, data.eval))
    assert len(train) == 3000 and len(val) == 100 and len(ev) == 100
    assert not (train & val) and not (train & ev) and not (val & ev)


def test_deterministic_and_eval_independent_of_train_size(data):
    assert load_task(CFG) == data
    smaller = load_task(TaskConfig(name="word_problems", num_train=50, num_val=100, num_eval=100))
    assert smaller.eval == data.eval and smaller.val == data.val
    other = load_task(TaskConfig(name="word_problems", num_train=50, num_val=100, num_eval=100, seed=9))
    assert other.eval != data.eval


def test_surface_variety(data):
    prompts = " ".join(ex.prompt for ex in data.train)
    assert sum(name in prompts for name, _ in NAMES) == len(NAMES)
    assert sum(plural in prompts for _, plural in OBJECTS) == len(OBJECTS)
    assert prompts.isascii()


def test_config_accepts_large_counts():
    assert num_distinct_problems() > 10**6
    TaskConfig(name="word_problems", num_train=200_000)  # not refused by the addition-sized cap
