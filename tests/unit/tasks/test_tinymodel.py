"""rlsys.tasks.tinymodel: tokenizer, config validation, greedy decoding, the cached warm-started build."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rlsys.tasks import tinymodel
from rlsys.tasks.arithmetic import ALPHABET, Example, TaskConfig, load_task
from rlsys.tasks.config import ModelConfig
from rlsys.tasks.tinymodel import (
    build_tokenizer,
    decode_completion,
    encode_prompt,
    ensure_model,
    greedy_accuracy,
    greedy_generate,
)

TINY = dict(
    num_layers=1,
    hidden_size=64,
    num_heads=2,
    intermediate_size=128,
    max_position=32,
    warmstart_max_steps=30,
    warmstart_batch_size=32,
    warmstart_eval_every=10,
    warmstart_target_accuracy=0.99,
)
TINY_TASK = TaskConfig(digits=2, num_train=500, num_val=50, num_eval=50)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build shared by the tests that only read it."""
    cache = tmp_path_factory.mktemp("cache")
    return ensure_model(ModelConfig(cache_dir=str(cache), **TINY), TINY_TASK)


# ----------------------------------------------------------------------------- tokenizer


def test_vocabulary_layout(tok):
    assert len(tok) == len(ALPHABET) + 3 <= 16
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.convert_tokens_to_ids(ch) for ch in ALPHABET] == list(range(3, 3 + len(ALPHABET)))


def test_encode_prompt_prepends_bos_and_splits_characters(tok):
    ids = encode_prompt(tok, "123+45=")
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == list("123+45=")


def test_encode_prompt_rejects_unknown_characters(tok):
    with pytest.raises(ValueError, match="cannot encode: ' x'"):
        encode_prompt(tok, "1 x")


def test_decode_completion_stops_at_eos_and_drops_specials(tok):
    ids = tok("168", add_special_tokens=False)["input_ids"]
    assert decode_completion(tok, ids) == "168"
    assert decode_completion(tok, [*ids, tok.eos_token_id, *ids]) == "168"
    assert decode_completion(tok, [tok.bos_token_id, *ids, tok.pad_token_id]) == "168"
    assert decode_completion(tok, [tok.eos_token_id, *ids]) == ""
    assert decode_completion(tok, []) == ""


def test_round_trip_every_character(tok):
    text = ALPHABET + ALPHABET[::-1]
    assert decode_completion(tok, encode_prompt(tok, text)) == text


def test_save_and_reload_with_auto_tokenizer(tok, tmp_path):
    tinymodel.save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    for text in ["123+45=", "0+0=", "999999+999999="]:
        assert encode_prompt(again, text) == encode_prompt(tok, text)
        assert again(text)["input_ids"] == encode_prompt(tok, text)
    ids = encode_prompt(tok, "987")
    assert again.decode(ids, skip_special_tokens=True) == "987"


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_heads": 1},
            r"model.hidden_size / model.num_heads must be one of \[32, 64\].* = 128; change model.num_heads",
        ),
        ({"hidden_size": 128, "num_heads": 8}, "must be one of \\[32, 64\\]"),
        ({"hidden_size": 130}, "divisible by model.num_heads"),
        ({"num_layers": 0}, "model.num_layers must be an integer >= 1, got 0"),
        ({"intermediate_size": -3}, "model.intermediate_size"),
        ({"max_position": 4}, "model.max_position"),
        ({"warmstart_max_steps": -1}, "model.warmstart_max_steps"),
        ({"warmstart_batch_size": 0}, "model.warmstart_batch_size"),
        ({"warmstart_lr": 0.0}, "model.warmstart_lr"),
        ({"warmstart_target_accuracy": 1.5}, "model.warmstart_target_accuracy"),
        ({"warmstart_eval_every": 0}, "model.warmstart_eval_every"),
        ({"cache_dir": ""}, "model.cache_dir"),
        ({"path": ""}, "model.path"),
    ],
)
def test_model_config_validation_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_model_config_accepts_head_dims_32_and_64():
    assert ModelConfig(hidden_size=128, num_heads=2).num_heads == 2
    assert ModelConfig(hidden_size=64, num_heads=2).num_heads == 2


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def random_model(tok):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(tinymodel._llama_config(ModelConfig(**TINY), tok))
    return model.eval()


def test_greedy_generate_matches_hf_generate_one_prompt_at_a_time(tok, random_model):
    prompts = [encode_prompt(tok, p) for p in ["1+2=", "12+34=", "5+67=", "99+9=", "3+4="]]
    got = greedy_generate(random_model, prompts, max_new_tokens=5, eos_token_id=tok.eos_token_id, batch_size=2)
    for prompt, completion in zip(prompts, got):
        out = random_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(prompt) :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        assert completion == out
        assert len(completion) <= 5


def test_greedy_accuracy_counts_exact_answers_and_equals_teacher_forced_exact_match(tok, built):
    model = AutoModelForCausalLM.from_pretrained(built)
    val = load_task(TINY_TASK).val
    completions = greedy_generate(model, [encode_prompt(tok, ex.prompt) for ex in val], 6, tok.eos_token_id)
    assert all(c[-1] == tok.eos_token_id for c in completions)
    # Even rows: the answer is what the model says; odd rows: one digit more, which it does not say.
    said = [decode_completion(tok, c) for c in completions]
    examples = [
        Example(ex.id, ex.prompt, text if i % 2 == 0 else text + "0") for i, (ex, text) in enumerate(zip(val, said))
    ]
    expected = sum(1 for i in range(len(val)) if i % 2 == 0) / len(val)
    assert greedy_accuracy(model, tok, examples, batch_size=7) == expected
    ids_NL, mask_NL = tinymodel._pack(tok, examples)
    assert tinymodel._teacher_forced_exact_match(model, ids_NL, mask_NL) == pytest.approx(expected)


def test_greedy_accuracy_rejects_empty_input(tok, random_model):
    with pytest.raises(ValueError, match="at least one example"):
        greedy_accuracy(random_model, tok, [])


# ----------------------------------------------------------------------------- ensure_model


def test_build_writes_a_complete_loadable_entry(built):
    names = {p.name for p in built.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "warmstart.json",
        "DONE",
    } <= names
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")], "temp directories left behind"
    record = json.loads((built / "warmstart.json").read_text())
    assert record["steps"] == 30 and record["reached_target"] is False
    assert [h[0] for h in record["val_history"]] == [10, 20, 30]
    assert 0.0 <= record["val_accuracy"] <= 1.0 and record["seconds"] > 0
    model = AutoModelForCausalLM.from_pretrained(built)
    assert model.config.tie_word_embeddings is False
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 1
    tok = AutoTokenizer.from_pretrained(built)
    assert record["val_accuracy"] == greedy_accuracy(model, tok, load_task(TINY_TASK).val)


def test_cache_hit_returns_the_same_directory_without_rebuilding(built, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt on a cache hit")

    monkeypatch.setattr(tinymodel, "_build", no_build)
    assert ensure_model(ModelConfig(cache_dir=str(built.parent), **TINY), TINY_TASK) == built


def test_builds_in_two_cache_dirs_are_bit_identical_and_restore_threads(built, tmp_path):
    threads = torch.get_num_threads()
    other = ensure_model(ModelConfig(cache_dir=str(tmp_path), **TINY), TINY_TASK)
    assert torch.get_num_threads() == threads
    assert other != built and other.name == built.name
    a, b = load_file(built / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cache_key_depends_on_configs_but_not_cache_dir(tmp_path):
    key = tinymodel.cache_key
    base = ModelConfig(**TINY)
    assert key(base, TINY_TASK) == key(ModelConfig(**{**TINY, "cache_dir": str(tmp_path)}), TINY_TASK)
    assert key(base, TINY_TASK) != key(ModelConfig(**{**TINY, "seed": 1}), TINY_TASK)
    assert key(base, TINY_TASK) != key(base, TaskConfig(digits=2, num_train=501, num_val=50, num_eval=50))


def test_cache_key_follows_the_data_file_contents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "prompt": "1+1=", "answer": "2", "split": "train"}\n')
    task = TaskConfig(data_path=str(path))
    before = tinymodel.cache_key(ModelConfig(), task)
    path.write_text('{"id": "a", "prompt": "1+1=", "answer": "3", "split": "train"}\n')
    assert tinymodel.cache_key(ModelConfig(), task) != before


def test_model_path_is_returned_as_is(built, tmp_path):
    assert ensure_model(ModelConfig(path=str(built), cache_dir=str(tmp_path / "unused")), TINY_TASK) == built
    assert not (tmp_path / "unused").exists()
    with pytest.raises(FileNotFoundError, match="model.path"):
        ensure_model(ModelConfig(path=str(tmp_path / "missing")), TINY_TASK)


def test_max_position_too_short_for_the_task(tmp_path):
    cfg = ModelConfig(cache_dir=str(tmp_path), **{**TINY, "max_position": 16})
    with pytest.raises(ValueError, match="model.max_position=16 is shorter"):
        ensure_model(cfg, TaskConfig(digits=6, num_train=10, num_val=2, num_eval=2))
    assert [p.name for p in tmp_path.iterdir()] == [], "a failed build left files behind"


def test_publish_keeps_an_entry_another_builder_finished_first(tmp_path):
    final, mine = tmp_path / "key", tmp_path / ".tmp-key-1"
    for d, tag in [(final, "theirs"), (mine, "mine")]:
        d.mkdir()
        (d / "DONE").write_text(tag)
    tinymodel._publish(mine, final)
    assert (final / "DONE").read_text() == "theirs"


def test_publish_replaces_an_incomplete_entry(tmp_path):
    final, mine = tmp_path / "key", tmp_path / ".tmp-key-1"
    final.mkdir()
    (final / "model.safetensors").write_text("half")
    mine.mkdir()
    (mine / "DONE").write_text("mine")
    tinymodel._publish(mine, final)
    assert (final / "DONE").read_text() == "mine" and not (final / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["key"]
