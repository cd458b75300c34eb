"""rlsys.tasks.arithmetic: generated splits, JSONL loading and its errors, the verifier."""

import json
from pathlib import Path

import pytest

from rlsys.tasks.arithmetic import (
    ALPHABET,
    DatasetError,
    Example,
    TaskConfig,
    counting_answer,
    load_task,
    scratchpad_credit,
    verify_answer,
)

SAMPLE = Path(__file__).resolve().parents[3] / "rlsys" / "tasks_data" / "addition_sample.jsonl"


def _prompts(rows):
    return {ex.prompt for ex in rows}


# ----------------------------------------------------------------------------- generator


def test_generated_splits_have_the_configured_sizes_and_format():
    data = load_task(TaskConfig(digits=2, num_train=500, num_val=50, num_eval=40))
    assert (len(data.train), len(data.val), len(data.eval)) == (500, 50, 40)
    for ex in [*data.train, *data.val, *data.eval]:
        a, b = ex.prompt[:-1].split("+")
        assert ex.prompt == f"{int(a)}+{int(b)}="
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100
        assert ex.answer == str(int(a) + int(b))


def test_counting_answers_are_the_counting_scratchpad_and_long():
    """The generation-heavy task: "a+b=" -> "a+1+(b-1)=...=(a+b)+0", count_min..count_max terms."""
    assert counting_answer(57, 3) == "58+2=59+1=60+0"
    data = load_task(TaskConfig(name="counting", num_train=2000, num_val=50, num_eval=100))
    for ex in [*data.train, *data.val, *data.eval]:
        a, b = (int(x) for x in ex.prompt[:-1].split("+"))
        assert 0 <= a < 1000 and 24 <= b <= 32
        terms = ex.answer.split("=")
        assert len(terms) == b and terms[-1] == f"{a + b}+0" and terms[0] == f"{a + 1}+{b - 1}"
        assert set(ex.answer) <= set(ALPHABET)
        assert 125 <= len(ex.answer) + 1 <= 246  # characters are tokens; + eos
    assert len(_prompts([*data.train, *data.val, *data.eval])) == 2150
    assert load_task(TaskConfig(name="counting", num_train=2000, num_val=50, num_eval=100)) == data


def test_scratchpad_credit_counts_leading_correct_terms():
    ref = counting_answer(57, 4)  # 58+3=59+2=60+1=61+0
    assert scratchpad_credit(ref, ref) == 1.0 == scratchpad_credit(f" {ref}\n", ref)
    assert scratchpad_credit("58+3=59+2=61+1=62+0", ref) == 0.5
    assert scratchpad_credit("58+3=59+2", ref) == 0.5  # stopped early
    assert scratchpad_credit(ref + "=62+-1=63+-2=64+-3=65+-4", ref) == 0.5  # did not stop
    assert scratchpad_credit("", ref) == 0.0 == scratchpad_credit("59+3=59+2", ref)
    from rlsys.reward.worker import REWARD_FUNCTIONS

    assert REWARD_FUNCTIONS["scratchpad_credit"] is scratchpad_credit


def test_generated_splits_are_pairwise_disjoint_and_unique():
    data = load_task(TaskConfig(digits=2, num_train=3000, num_val=200, num_eval=200))
    train, val, eval_ = _prompts(data.train), _prompts(data.val), _prompts(data.eval)
    assert len(train) == 3000 and len(val) == 200 and len(eval_) == 200
    assert not train & val and not train & eval_ and not val & eval_
    ids = [ex.id for ex in [*data.train, *data.val, *data.eval]]
    assert len(set(ids)) == len(ids)


def test_all_problems_can_be_drawn_when_counts_fill_the_space():
    data = load_task(TaskConfig(digits=1, num_train=80, num_val=10, num_eval=10))
    assert len(_prompts(data.train) | _prompts(data.val) | _prompts(data.eval)) == 100


def test_generation_is_deterministic_for_a_seed_and_varies_with_it():
    cfg = TaskConfig(num_train=1000)
    assert load_task(cfg) == load_task(TaskConfig(num_train=1000))
    assert load_task(TaskConfig(num_train=1000, seed=99)).eval != load_task(cfg).eval


def test_eval_split_does_not_depend_on_the_amount_of_training_data():
    assert load_task(TaskConfig(num_train=100)).eval == load_task(TaskConfig(num_train=5000)).eval


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"digits": 9}, "task.digits must be in 1..6, got 9"),
        ({"digits": 0}, "task.digits"),
        ({"num_train": 0}, "task.num_train"),
        ({"num_eval": 0}, "task.num_eval"),
        ({"num_val": -1}, "task.num_val"),
        ({"name": "sorting"}, "task.name"),
        ({"digits": 1, "num_train": 95}, "exceeds the 100 distinct problems"),
        (
            {
                "name": "counting",
                "digits": 1,
                "count_min": 2,
                "count_max": 3,
                "num_train": 5,
                "num_val": 5,
                "num_eval": 11,
            },
            "exceeds the 20 distinct problems",
        ),
        ({"count_min": 0}, "count_min"),
        ({"count_min": 9, "count_max": 8}, "count_min <= count_max"),
        ({"data_path": ""}, "task.data_path"),
    ],
)
def test_config_validation_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)


def test_custom_name_is_allowed_with_a_data_file():
    assert TaskConfig(name="my-sums", data_path=str(SAMPLE)).name == "my-sums"


# ----------------------------------------------------------------------------- JSONL


def test_sample_file_loads_with_disjoint_splits():
    data = load_task(TaskConfig(data_path=str(SAMPLE)))
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    n_eval = sum(r["split"] == "eval" for r in rows)
    assert 40 <= len(rows) <= 60 and n_eval >= 5
    assert len(data.eval) == n_eval
    assert len(data.train) + len(data.val) == len(rows) - n_eval
    assert len(data.val) == (len(rows) - n_eval) // 2  # num_val=200 is capped at half the train rows
    assert not _prompts(data.train) & _prompts(data.val)
    assert not (_prompts(data.train) | _prompts(data.val)) & _prompts(data.eval)
    for ex in [*data.train, *data.val, *data.eval]:
        a, b = ex.prompt[:-1].split("+")
        assert verify_answer(str(int(a) + int(b)), ex.answer) == 1.0
    assert load_task(TaskConfig(data_path=str(SAMPLE))) == data


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line + "\n" for line in lines))
    return path


def _row(i, split="train", **overrides):
    row = {"id": f"r{i}", "prompt": f"{i}+1=", "answer": str(i + 1), "split": split}
    row.update(overrides)
    return json.dumps(row)


GOOD = [_row(1), _row(2), _row(3, "eval")]


def test_small_file_loads_and_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path, [GOOD[0], "", "   ", GOOD[1], GOOD[2]])
    data = load_task(TaskConfig(data_path=str(path), num_val=5))
    assert len(data.train) == 1 and len(data.val) == 1
    assert data.eval == [Example(id="r3", prompt="3+1=", answer="4")]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"id": "x", "prompt": "1+1=", ', "invalid JSON"),
        ("[1, 2]", "a row must be a JSON object, got list"),
        (json.dumps({"id": "x", "prompt": "7+7=", "split": "train"}), "missing field 'answer'"),
        (json.dumps({"prompt": "7+7=", "answer": "14", "split": "train"}), "missing field 'id'"),
        (_row(7, answer=14), "field 'answer' must be a string, got int"),
        (_row(7, prompt=None), "field 'prompt' must be a string, got null"),
        (_row(7, prompt=""), "field 'prompt' must not be empty"),
        (_row(7, prompt="7 + 7 ="), "characters outside the tokenizer's alphabet"),
        (_row(7, answer="fourteen"), "field 'answer' has characters outside"),
        (_row(7, split="test"), "field 'split' must be one of"),
        (_row(8, id="r1"), "duplicate id 'r1' (first at line 1)"),
        (_row(8, prompt="1+1="), "duplicate prompt '1+1=' (first at line 1)"),
    ],
)
def test_malformed_row_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = _write(tmp_path, [GOOD[0], GOOD[1], GOOD[2], bad_line])
    with pytest.raises(DatasetError) as excinfo:
        load_task(TaskConfig(data_path=str(path)))
    message = str(excinfo.value)
    assert message.startswith(f"{path}:4: ")
    assert problem in message


def test_invalid_utf8_names_the_line(tmp_path):
    raw = (
        "\n".join(GOOD) + "\n"
    ).encode() + b'{"id": "\xff\xfe", "prompt": "5+5=", "answer": "10", "split": "train"}\n'
    path = _write(tmp_path, raw)
    with pytest.raises(DatasetError, match=r"data\.jsonl:4: invalid UTF-8"):
        load_task(TaskConfig(data_path=str(path)))


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([_row(1), _row(2)], 'no rows with "split": "eval"'),
        ([_row(1, "eval")], 'no rows with "split": "train"'),
        ([_row(1), _row(2, "eval")], "at least 2 train rows"),
    ],
)
def test_file_level_problems(tmp_path, lines, problem):
    path = _write(tmp_path, lines)
    with pytest.raises(DatasetError, match=problem):
        load_task(TaskConfig(data_path=str(path)))


def test_missing_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot read task.data_path"):
        load_task(TaskConfig(data_path=str(tmp_path / "nope.jsonl")))


# ----------------------------------------------------------------------------- verifier


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("168", "168", 1.0),
        ("  168\n", "168", 1.0),
        ("168 ", "168", 1.0),
        ("1680", "168", 0.0),
        ("16", "168", 0.0),
        ("", "168", 0.0),
        ("0168", "168", 0.0),
        ("1 68", "168", 0.0),
    ],
)
def test_verify_answer_is_exact_match_after_strip(completion, answer, reward):
    assert verify_answer(completion, answer) == reward


def test_alphabet_covers_the_generated_task():
    data = load_task(TaskConfig(num_train=200))
    used = {ch for ex in [*data.train, *data.val, *data.eval] for ch in ex.prompt + ex.answer}
    assert used <= set(ALPHABET)
