"""Reading, checking, chat-templating and tokenizing user prompts (rlsys/data/)."""

from __future__ import annotations

import json

import pytest

from rlsys.data.config import DataConfig
from rlsys.data.prompts import build_prompts
from rlsys.tasks.arithmetic import DatasetError
from rlsys.tasks.chatmodel import build_bpe_tokenizer

CORPUS = [
    "Ivan has 4 marbles. He buys 3 more. How many marbles does Ivan have now?",
    "You are a careful tutor. Answer with a number.",
    "Ünïcode — text, and tabs\tand spaces.",
    "system user assistant tool",
] * 20


@pytest.fixture(scope="module")
def chatml():
    return build_bpe_tokenizer(CORPUS, 400, "chatml")


@pytest.fixture(scope="module")
def llama3():
    return build_bpe_tokenizer(CORPUS, 400, "llama3")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(n=6, eval_n=2):
    out = [
        {"question": f"Ivan has {i} marbles. He buys 3 more. How many?", "answer": str(i + 3), "level": i % 3}
        for i in range(n)
    ]
    for r in out[:eval_n]:
        r["split"] = "test"
    for r in out[eval_n:]:
        r["split"] = "train"
    return out


def cfg(path, **kw):
    return DataConfig(train_files=path, prompt_key="question", **kw)


def test_jsonl_with_a_split_column_through_the_chat_template(tmp_path, chatml):
    ps = build_prompts(cfg(write_jsonl(tmp_path / "d.jsonl", rows())), chatml, 200)
    assert len(ps.train) == 4 and len(ps.eval) == 2 and ps.templated
    p = ps.eval[0]
    question = "Ivan has 0 marbles. He buys 3 more. How many?"
    assert p.prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert list(p.prompt_token_ids) == chatml(p.prompt, add_special_tokens=False)["input_ids"]
    assert p.reference == "3" and p.raw_prompt == "Ivan has 0 marbles. He buys 3 more. How many?"
    assert p.meta == {"level": 0}  # every other column reaches the reward as meta (the split column does not)
    assert p.request_data() == {"prompt": p.raw_prompt, "row": {"level": 0}}


def test_ids_are_derived_from_content_stable_across_row_order(tmp_path, chatml):
    a = build_prompts(cfg(write_jsonl(tmp_path / "a.jsonl", rows())), chatml, 200)
    b = build_prompts(cfg(write_jsonl(tmp_path / "b.jsonl", list(reversed(rows())))), chatml, 200)
    assert {p.prompt_id: p.reference for p in a.train} == {p.prompt_id: p.reference for p in b.train}
    assert len({p.prompt_id for p in a.train + a.eval}) == 6


def test_duplicate_prompts_keep_distinct_ids_but_duplicate_given_ids_are_refused(tmp_path, chatml):
    data = rows() + [dict(rows()[3])]
    ps = build_prompts(cfg(write_jsonl(tmp_path / "d.jsonl", data)), chatml, 200)
    assert len({p.prompt_id for p in ps.train}) == len(ps.train) == 5
    for i, r in enumerate(data):
        r["uid"] = f"u{min(i, 5)}"
    with pytest.raises(DatasetError, match=r"prompt id 'u5' appears more than once \(data.id_key\)"):
        build_prompts(cfg(write_jsonl(tmp_path / "e.jsonl", data), id_key="uid"), chatml, 200)


def test_messages_with_a_system_prompt_and_llama3_no_double_bos(tmp_path, llama3):
    data = [
        {"messages": [{"role": "user", "content": f"Add {i} and 2."}], "answer": i + 2, "split": s}
        for i, s in zip(range(4), ["train", "train", "train", "eval"])
    ]
    path = write_jsonl(tmp_path / "m.jsonl", data)
    c = DataConfig(train_files=path, prompt_key="messages", system_prompt="Be brief.")
    ps = build_prompts(c, llama3, 200)
    p = ps.train[0]
    assert p.prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    bos = llama3.bos_token_id
    assert p.prompt_token_ids[0] == bos and p.prompt_token_ids[1] != bos  # one BOS, written by the template
    assert p.reference == "2"  # a number becomes its string
    assert p.raw_prompt == [{"role": "user", "content": "Add 0 and 2."}]


def test_parquet_and_save_to_disk(tmp_path, chatml):
    import datasets

    ds = datasets.Dataset.from_list(rows())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    a = build_prompts(cfg(str(tmp_path / "d.parquet")), chatml, 200)
    datasets.DatasetDict({"train": ds.select(range(2, 6)), "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dd")
    )
    b = build_prompts(cfg(str(tmp_path / "dd")), chatml, 200)
    assert [p.prompt_id for p in a.train] == [p.prompt_id for p in b.train]
    assert [p.prompt_id for p in a.eval] == [p.prompt_id for p in b.eval]


def test_separate_eval_files_and_a_list_of_train_files(tmp_path, chatml):
    data = rows()
    for r in data:
        r.pop("split")
    a = write_jsonl(tmp_path / "a.jsonl", data[:3])
    b = write_jsonl(tmp_path / "b.jsonl", data[3:5])
    e = write_jsonl(tmp_path / "e.jsonl", data[5:])
    ps = build_prompts(DataConfig(train_files=[a, b], eval_files=e, prompt_key="question"), chatml, 200)
    assert len(ps.train) == 5 and len(ps.eval) == 1
    held = build_prompts(DataConfig(train_files=[a, b], eval_size=2, prompt_key="question"), chatml, 200)
    assert len(held.train) == 3 and len(held.eval) == 2
    with pytest.raises(DatasetError, match="no held-out prompts; give data.eval_files"):
        build_prompts(DataConfig(train_files=[a, b], prompt_key="question"), chatml, 200)


def test_overlong_prompts_are_dropped_and_counted_or_refused(tmp_path, chatml, caplog):
    data = rows()
    data[3]["question"] = "Ivan has many marbles. " * 40
    path = write_jsonl(tmp_path / "d.jsonl", data)
    ps = build_prompts(cfg(path), chatml, 60)
    assert ps.dropped_overlong == 1 and len(ps.train) == 3
    assert ps.describe() == {
        "train_prompts": 3, "eval_prompts": 2, "dropped_overlong": 1, "chat_template": True, "sources": [path],
    }  # fmt: skip
    assert "dropped 1 prompt(s) longer than the 60 tokens" in caplog.text
    with pytest.raises(DatasetError, match=r"d.jsonl: row 4: prompt has \d+ tokens, more than the 60"):
        build_prompts(cfg(path, overlong_prompts="error"), chatml, 60)
    with pytest.raises(DatasetError, match="no training prompts left after dropping 6 over-long prompt"):
        build_prompts(cfg(path), chatml, 5)


def test_a_second_start_reads_the_tokenized_cache(tmp_path, chatml, monkeypatch):
    import rlsys.data.prompts as prompts

    monkeypatch.setattr(prompts, "CACHE_DIR", tmp_path / "cache")
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    first = build_prompts(cfg(path), chatml, 200)
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 1
    build_prompts(cfg(path, system_prompt="Be brief."), chatml, 200)  # other settings: another entry
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 2
    calls = []
    monkeypatch.setattr(prompts._Encoder, "__call__", lambda *a: calls.append(a))
    again = build_prompts(cfg(path), chatml, 200)
    assert calls == [] and again.train == first.train


def test_plain_text_without_a_template(tmp_path, chatml):
    ps = build_prompts(cfg(write_jsonl(tmp_path / "d.jsonl", rows()), chat_template="none"), chatml, 200)
    assert not ps.templated and ps.train[0].prompt == "Ivan has 2 marbles. He buys 3 more. How many?"


def test_a_template_file_replaces_the_tokenizers(tmp_path, chatml):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")
    tok = build_bpe_tokenizer(CORPUS, 400, "chatml")
    ps = build_prompts(cfg(write_jsonl(tmp_path / "d.jsonl", rows()), chat_template=str(template)), tok, 200)
    assert ps.train[0].prompt == "Q: Ivan has 2 marbles. He buys 3 more. How many?\nA:"
