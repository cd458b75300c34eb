"""rlsys.tasks.chatmodel: BPE tokenizers with chat templates, Qwen2/Llama fixtures, the chat policy build."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlsys.tasks.arithmetic import Example, TaskConfig
from rlsys.tasks.chatmodel import (
    boxed_correct,
    build_bpe_tokenizer,
    build_fixture,
    chat_sequences,
    completion_text,
    encode_chat_prompt,
    ensure_fixture,
)
from rlsys.tasks.config import ModelConfig
from rlsys.tasks.models import ensure_model

CORPUS = [
    "Ivan has 4 marbles. He buys 3 more. How many marbles does Ivan have now?",
    "Maria has 12 apples and Tom has 7 apples. How many apples do they have together?",
    "\\boxed{7}",
    "\\boxed{19}",
    "user",
    "assistant",
] * 20
TEXTS = ["  Zoë hat 3 €  — 日本語!\n\n\tok ", "a  b   c", " leading and trailing ", "12345 + 678 = 13023"]
USER = [{"role": "user", "content": "Ivan has 4 marbles."}]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tok(request):
    return build_bpe_tokenizer(CORPUS, 400, request.param)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """One built fixture per architecture (default style: qwen2/chatml, llama/llama3)."""
    root = tmp_path_factory.mktemp("fixtures")
    return {arch: build_fixture(root / arch, arch) for arch in ("qwen2", "llama")}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic(tok):
    style = "llama3" if tok.bos_token else "chatml"
    again = build_bpe_tokenizer(CORPUS, 400, style)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_with_spaces_and_non_ascii(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_digits_split_like_the_real_tokenizers(tok):
    pieces = [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234")]
    assert pieces == (["123", "4"] if tok.bos_token else ["1", "2", "3", "4"])


def test_chatml_specials_and_template():
    tok = build_bpe_tokenizer(CORPUS, 400, "chatml")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert tok("Ivan")["input_ids"] == tok("Ivan", add_special_tokens=False)["input_ids"]  # no bos added
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    assert (
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIvan has 4 marbles.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(USER, tokenize=False) == "<|im_start|>user\nIvan has 4 marbles.<|im_end|>\n"
    ids = encode_chat_prompt(tok, "Ivan has 4 marbles.")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "assistant", "Ċ"]  # role words are one token


def test_llama3_specials_template_and_no_double_bos():
    tok = build_bpe_tokenizer(CORPUS, 400, "llama3")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", None)
    assert tok("Ivan")["input_ids"][0] == tok.bos_token_id  # the post-processor prepends bos
    text = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIvan has 4 marbles.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # the trap encode_chat_prompt avoids
    assert encode_chat_prompt(tok, "Ivan has 4 marbles.") == ids


def test_chat_sequences_put_the_loss_on_the_boxed_answer_and_eos():
    tok = build_bpe_tokenizer(CORPUS, 400, "chatml")
    (seq,), (start,) = chat_sequences(tok, [Example("x", "Ivan has 4 marbles.", "7")])
    assert seq[:start] == encode_chat_prompt(tok, "Ivan has 4 marbles.")
    assert seq[-1] == tok.eos_token_id
    assert tok.decode(seq[start:-1]) == completion_text("7") == "\\boxed{7}"


def test_boxed_correct():
    assert boxed_correct("\\boxed{7}", "7") and boxed_correct("so \\boxed{ 07 } done", "7")
    assert not boxed_correct("7", "7") and not boxed_correct("\\boxed{8}", "7") and not boxed_correct("", "7")
    assert not boxed_correct("\\boxed{8} \\boxed{7}", "7")  # the first box counts


# ----------------------------------------------------------------------------- fixtures


def test_fixture_reloads_with_auto_classes(fixtures):
    for arch, path in fixtures.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]]
        assert config["vocab_size"] == len(tok) == model.get_input_embeddings().num_embeddings
        assert config["num_key_value_heads"] == 1 and config["hidden_size"] // config["num_attention_heads"] == 32
        assert config["tie_word_embeddings"] is (arch == "qwen2")
        assert tok.chat_template and "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
        ids = encode_chat_prompt(tok, "Ivan has 4 marbles.")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), len(tok))


def test_fixture_pad_and_generation_config_eos(fixtures):
    qwen = AutoTokenizer.from_pretrained(fixtures["qwen2"])
    llama = AutoTokenizer.from_pretrained(fixtures["llama"])
    assert qwen.pad_token == "<|endoftext|>" and qwen.bos_token is None
    assert llama.pad_token is None and llama.bos_token == "<|begin_of_text|>"
    qwen_gen = json.loads((fixtures["qwen2"] / "generation_config.json").read_text())
    llama_gen = json.loads((fixtures["llama"] / "generation_config.json").read_text())
    assert qwen_gen["eos_token_id"] == qwen.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert llama_gen["eos_token_id"] == llama.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert qwen_gen["eos_token_id"][0] == qwen.eos_token_id and llama_gen["eos_token_id"][0] == llama.eos_token_id


def test_fixture_build_is_deterministic(fixtures, tmp_path):
    def digest(path):
        return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in ("model.safetensors", "tokenizer.json")}

    assert digest(build_fixture(tmp_path / "again", "llama")) == digest(fixtures["llama"])
    assert (
        digest(build_fixture(tmp_path / "seed", "llama", seed=1))["model.safetensors"]
        != digest(fixtures["llama"])["model.safetensors"]
    )


def test_ensure_fixture_caches(tmp_path):
    first = ensure_fixture("qwen2", "llama3", cache_dir=str(tmp_path))
    assert (first / "DONE").is_file() and ensure_fixture("qwen2", "llama3", cache_dir=str(tmp_path)) == first
    assert AutoTokenizer.from_pretrained(first).bos_token == "<|begin_of_text|>"
    assert ensure_fixture("llama", cache_dir=str(tmp_path)) != first


# ----------------------------------------------------------------------------- the chat policy


def test_model_config_kind_and_vocab_size_are_validated():
    with pytest.raises(ValueError, match="model.kind"):
        ModelConfig(kind="bpe")
    with pytest.raises(ValueError, match="model.vocab_size"):
        ModelConfig(kind="chat", vocab_size=100)


def test_ensure_model_builds_the_chat_model(tmp_path):
    """A minimal chat build through tinymodel.ensure_model (a few warm-start steps)."""
    cfg = ModelConfig(
        kind="chat",
        num_layers=1,
        hidden_size=64,
        num_heads=2,
        intermediate_size=128,
        max_position=64,
        warmstart_max_steps=4,
        warmstart_batch_size=16,
        warmstart_eval_every=2,
        warmstart_target_accuracy=1.0,
        cache_dir=str(tmp_path),
    )
    task = TaskConfig(name="word_problems", num_train=200, num_val=20, num_eval=20)
    path = ensure_model(cfg, task)
    assert ensure_model(cfg, task) == path and (path / "DONE").is_file()
    record = json.loads((path / "warmstart.json").read_text())
    assert record["steps"] == 4 and record["kind"] == "chat" and 0.0 <= record["val_accuracy"] <= 1.0
    assert record["max_prompt_tokens"] + max(record["completion_tokens_with_eos"]) <= 64
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]
    )
    with pytest.raises(ValueError, match="max_position"):
        ensure_model(ModelConfig(**{**cfg.__dict__, "max_position": 16}), task)
