"""Locally built chat models: byte-level BPE tokenizers with chat templates, Qwen2 / Llama models.

Two uses, nothing downloaded:

* the ``chat_tiny`` policy (``model.kind="chat"``): :func:`ensure_chat_model` builds, warm-starts
  and caches a small ``Qwen2ForCausalLM`` whose tokenizer is a byte-level BPE trained on the
  task's texts, with a ChatML chat template. Same cache and warm-start recipe as the character
  model of :mod:`rlsys.tasks.tinymodel` (whose machinery it reuses)::

      ensure_chat_model(ModelConfig(kind="chat", ...), TaskConfig(name="word_problems"))
        -> cache hit: <cache_dir>/<key>/ holds DONE -> return it
        -> miss: BPE tokenizer ("chatml") trained on every split's prompts and answers
                 + random Qwen2 (seeded, tied embeddings)
                 -> supervised warm start on task.train: the sequence is the chat-templated
                    prompt (user turn + generation prompt, tokenized without added specials)
                    + the tokens of "\\boxed{ANSWER}" + <|im_end|>; loss on the completion only;
                    stop when teacher-forced greedy val accuracy reaches warmstart_target_accuracy
                 -> save (safetensors, config, generation_config, tokenizer, warmstart.json)

* fixtures for integration tests (:func:`build_fixture`, cached by :func:`ensure_fixture`): tiny
  random models of real Hugging Face architectures with real tokenizer types, so that code
  written against the character model meets what real checkpoints do:

  ====================  =====================================  ==========================================
  style                 chatml (Qwen2.5-Instruct-like)         llama3 (Llama-3-Instruct-like)
  ====================  =====================================  ==========================================
  specials              <|endoftext|> <|im_start|> <|im_end|>  <|begin_of_text|> <|end_of_text|>
                                                               <|start_header_id|> <|end_header_id|>
                                                               <|eot_id|>
  bos                   none                                   <|begin_of_text|>, prepended by the
                                                               post-processor (add_special_tokens=True)
  eos (tokenizer)       <|im_end|>                             <|eot_id|>
  pad                   <|endoftext|>                          none (pad_token is None)
  rendered template     starts with <|im_start|>               starts with <|begin_of_text|>: tokenize
                                                               it with add_special_tokens=False
  generation_config     eos [<|im_end|>, <|endoftext|>]        eos [<|eot_id|>, <|end_of_text|>]
  digits                one token each (Qwen2's split)         up to three per token (Llama 3's split)
  ====================  =====================================  ==========================================

  ``arch="qwen2"`` is a Qwen2ForCausalLM with q/k/v biases and tied embeddings; ``arch="llama"``
  a LlamaForCausalLM with an untied lm_head and, in the fixtures, grouped-query attention.

Determinism: the BPE trainer is deterministic for a given corpus, the weights are seeded and
built on one torch thread; same arguments, same files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlsys.tasks.arithmetic import Example, TaskConfig, TaskData, load_task
from rlsys.tasks.config import ALLOWED_HEAD_DIMS, ModelConfig
from rlsys.tasks.tinymodel import (
    WARMSTART_FILE,
    _teacher_forced_exact_match,
    _torch_threads,
    _warm_start,
    cached_build,
    config_key,
    greedy_generate,
    save_tokenizer,
)

__all__ = [
    "ARCHS",
    "CHAT_BUILD_VERSION",
    "STYLES",
    "FixtureConfig",
    "boxed_correct",
    "build_bpe_tokenizer",
    "build_fixture",
    "build_hf_model",
    "chat_greedy_accuracy",
    "chat_sequences",
    "completion_text",
    "encode_chat_prompt",
    "ensure_chat_model",
    "ensure_fixture",
    "eos_ids_for",
    "new_hf_model",
    "save_chat_tokenizer",
    "save_hf_model",
]

log = logging.getLogger(__name__)

CHAT_BUILD_VERSION = 1
"""Part of the chat model's and the fixtures' cache keys: bump it whenever the recipe changes."""

STYLES = ("chatml", "llama3")
ARCHS = ("qwen2", "llama")

# Pre-tokenizer patterns of the real tokenizers: Qwen2 splits digits one by one, Llama 3 in runs
# of up to three.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; generation prompt
``<|im_start|>assistant\\n``. No default system message (Qwen2.5's template adds one)."""

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
"""Llama 3: the rendered text starts with ``<|begin_of_text|>`` itself, then per message
``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""

_STYLE = {
    "chatml": dict(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        stops=("<|im_end|>", "<|endoftext|>"),
        template=CHATML_TEMPLATE,
        pattern=_QWEN2_PATTERN,
    ),
    "llama3": dict(
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        stops=("<|eot_id|>", "<|end_of_text|>"),
        template=LLAMA3_TEMPLATE,
        pattern=_LLAMA3_PATTERN,
    ),
}

ROLE_WORDS = ("system", "user", "assistant")
_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


# ----------------------------------------------------------------------------- tokenizer


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int, style: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with the specials, bos/eos/pad and chat
    template of ``style`` (``"chatml"`` or ``"llama3"``; see the module docstring).

    ``vocab_size`` counts the specials and the 256 byte tokens; a small corpus may run out of
    merges first (``len(tok)`` is then smaller). Any text encodes (bytes are the fallback) and
    decodes back to itself (NFC-normalised in the chatml style, as Qwen2's tokenizer does).
    """
    if style not in _STYLE:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    spec = _STYLE[style]
    core = Tokenizer(models.BPE())
    if style == "chatml":
        core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec["specials"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec["bos"] is None:
        core.post_processor = byte_level
    else:
        bos = spec["bos"]
        core.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos} $A",
                    pair=f"{bos} $A {bos} $B:1",
                    special_tokens=[(bos, core.token_to_id(bos))],
                ),
            ]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tok.chat_template = spec["template"]
    return tok


def save_chat_tokenizer(tok: PreTrainedTokenizerFast, directory: Path) -> None:
    """:func:`~rlsys.tasks.tinymodel.save_tokenizer` (portable class name), with the chat template
    also inside ``tokenizer_config.json`` (older transformers read it only from there)."""
    save_tokenizer(tok, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = tok.chat_template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def eos_ids_for(tok: PreTrainedTokenizerFast, style: str) -> list[int]:
    """The generation stop ids of ``style``, as the real models' generation_config.json lists
    them: the turn end first (the tokenizer's eos), then the end of text."""
    return [tok.convert_tokens_to_ids(t) for t in _STYLE[style]["stops"]]


def encode_chat_prompt(tok: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn in the chat template, generation prompt included.
    The rendered text carries any bos itself, so it is tokenized without added specials."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def completion_text(answer: str) -> str:
    """What the chat model is taught to answer: ``\\boxed{ANSWER}``."""
    return f"\\boxed{{{answer}}}"


def boxed_correct(text: str, answer: str) -> bool:
    """Whether ``text`` holds ``\\boxed{N}`` with N the integer ``answer`` (the first box counts)."""
    match = _BOXED.search(text)
    return match is not None and int(match.group(1)) == int(answer)


# ----------------------------------------------------------------------------- models


def new_hf_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_position: int,
    seed: int,
    eos_ids: Sequence[int],
    kv_heads: Optional[int] = None,
    tie_embeddings: Optional[bool] = None,
) -> PreTrainedModel:
    """A randomly initialised (seeded, float32) ``Qwen2ForCausalLM`` (``arch="qwen2"``) or
    ``LlamaForCausalLM`` (``"llama"``) for ``tokenizer`` (vocab_size = ``len(tokenizer)``), its
    generation config stopping at ``eos_ids``. ``kv_heads`` (default ``heads``) below ``heads``
    gives grouped-query attention; embeddings are tied by default for qwen2 (as in the small
    Qwen2 models), not for llama."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if hidden % heads or hidden // heads not in ALLOWED_HEAD_DIMS:
        raise ValueError(f"hidden / heads must be one of {list(ALLOWED_HEAD_DIMS)}, got {hidden}/{heads}")
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not eos_ids:
        raise ValueError("eos_ids must name at least one token")
    eos_ids = [int(i) for i in eos_ids]
    tie = (arch == "qwen2") if tie_embeddings is None else tie_embeddings
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    if arch == "qwen2":
        # Qwen2.5-Instruct's config.json names one eos (<|im_end|>), its generation_config two.
        config, cls = Qwen2Config(eos_token_id=eos_ids[0], **common), Qwen2ForCausalLM
    else:
        # Llama-3.1-Instruct's config.json lists every stop id, like its generation_config.
        config, cls = LlamaConfig(eos_token_id=list(eos_ids), **common), LlamaForCausalLM
    with _torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def save_hf_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Weights (safetensors), config.json, generation_config.json and the tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_chat_tokenizer(tokenizer, out_dir)


def build_hf_model(out_dir: Path, arch: str, tokenizer: PreTrainedTokenizerFast, **model_kwargs) -> PreTrainedModel:
    """:func:`new_hf_model` (same keyword arguments) saved into ``out_dir`` by
    :func:`save_hf_model`; returns the model."""
    model = new_hf_model(arch, tokenizer, **model_kwargs)
    save_hf_model(model, tokenizer, Path(out_dir))
    return model


# ----------------------------------------------------------------------------- fixtures


FIXTURE_TASK = TaskConfig(name="word_problems", num_train=300, num_val=1, num_eval=1, seed=7)
"""The fixtures' tokenizer corpus: 300 word problems (with their boxed answers and role words)."""


@dataclasses.dataclass(frozen=True)
class FixtureConfig:
    """What a fixture is built from (the cache key of :func:`ensure_fixture`)."""

    arch: str = "qwen2"
    style: str = "chatml"
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 128
    max_position: int = 256
    vocab_size: int = 512
    cache_dir: str = "~/.cache/rlsys/models"


def _default_style(arch: str) -> str:
    return "chatml" if arch == "qwen2" else "llama3"


def build_fixture(out_dir: Path, arch: str = "qwen2", style: Optional[str] = None, seed: int = 0) -> Path:
    """A tiny random ``arch`` model (hidden 64, 2 layers, 2 query heads sharing 1 key/value head,
    256 positions) with a ``style`` tokenizer (default: chatml for qwen2, llama3 for llama)
    trained on a built-in word-problem corpus, saved into ``out_dir``. Takes about a second."""
    cfg = FixtureConfig(arch=arch, style=style or _default_style(arch), seed=seed)
    _build_fixture(cfg, Path(out_dir))
    return Path(out_dir)


def ensure_fixture(
    arch: str = "qwen2", style: Optional[str] = None, seed: int = 0, cache_dir: str = "~/.cache/rlsys/models"
) -> Path:
    """:func:`build_fixture`, built once and cached (same cache mechanism as the policy models)."""
    cfg = FixtureConfig(arch=arch, style=style or _default_style(arch), seed=seed, cache_dir=cache_dir)
    return cached_build(
        Path(cache_dir).expanduser(),
        config_key(CHAT_BUILD_VERSION, "fixture", cfg, FIXTURE_TASK),
        lambda out: _build_fixture(cfg, out),
        f"{cfg.arch}/{cfg.style} fixture",
    )


def _build_fixture(cfg: FixtureConfig, out_dir: Path) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {cfg.arch!r}")
    tok = build_bpe_tokenizer(_corpus(load_task(FIXTURE_TASK)), cfg.vocab_size, cfg.style)
    tok.model_max_length = cfg.max_position
    build_hf_model(
        out_dir,
        cfg.arch,
        tok,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        intermediate=cfg.intermediate,
        max_position=cfg.max_position,
        seed=cfg.seed,
        eos_ids=eos_ids_for(tok, cfg.style),
    )


# ----------------------------------------------------------------------------- the chat_tiny policy


def ensure_chat_model(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Path:
    """Directory of the ``model.kind="chat"`` policy for these configs, built, warm-started and
    cached on a miss (see the module docstring). ``model.path``, when set, is handled by
    :func:`rlsys.tasks.models.ensure_model` before it gets here."""
    return cached_build(
        Path(model_cfg.cache_dir).expanduser(),
        config_key(CHAT_BUILD_VERSION, "chat_model", model_cfg, task_cfg),
        lambda out: _build_chat(model_cfg, task_cfg, out),
        "chat model",
    )


def _corpus(data: TaskData) -> list[str]:
    """The tokenizer's training texts: every split's prompts and boxed answers, and the role
    words once per example (so that each becomes one token)."""
    texts: list[str] = []
    for ex in (*data.train, *data.val, *data.eval):
        texts += [ex.prompt, completion_text(ex.answer), ex.answer, *ROLE_WORDS]
    return texts


def chat_sequences(tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> tuple[list[list[int]], list[int]]:
    """``chat-templated prompt + tokens of \\boxed{ANSWER} + eos`` of each example, and the
    prompt's length (where the loss starts)."""
    prompts = [encode_chat_prompt(tok, ex.prompt) for ex in examples]
    completions = tok([completion_text(ex.answer) for ex in examples], add_special_tokens=False)["input_ids"]
    sequences = [[*p, *c, tok.eos_token_id] for p, c in zip(prompts, completions)]
    return sequences, [len(p) for p in prompts]


def _pack_chat(tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids_NL, target_mask_NL) of :func:`chat_sequences`, as tinymodel's ``_pack``."""
    sequences, prompt_lengths = chat_sequences(tok, examples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n, length = len(sequences), max(len(s) for s in sequences)
    ids_NL = torch.full((n, length), pad, dtype=torch.long)
    target_mask_NL = torch.zeros((n, length), dtype=torch.bool)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        ids_NL[i, : len(seq)] = torch.tensor(seq)
        target_mask_NL[i, p : len(seq)] = True
    return ids_NL, target_mask_NL


def chat_greedy_accuracy(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, examples: Sequence[Example], batch_size: int = 256
) -> float:
    """Fraction of examples whose greedy completion (to eos, or a few tokens past the longest
    reference completion) holds ``\\boxed{ANSWER}`` (:func:`boxed_correct`)."""
    if not examples:
        raise ValueError("chat_greedy_accuracy needs at least one example")
    prompts = [encode_chat_prompt(tok, ex.prompt) for ex in examples]
    longest = max(len(tok(completion_text(ex.answer), add_special_tokens=False)["input_ids"]) for ex in examples)
    completions = greedy_generate(model, prompts, longest + 4, tok.eos_token_id, batch_size)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in completions]
    hits = [boxed_correct(text, ex.answer) for text, ex in zip(texts, examples)]
    return sum(hits) / len(hits)


def _build_chat(model_cfg: ModelConfig, task_cfg: TaskConfig, out_dir: Path) -> None:
    started = time.monotonic()
    data = load_task(task_cfg)
    tok = build_bpe_tokenizer(_corpus(data), model_cfg.vocab_size, "chatml")
    tok.model_max_length = model_cfg.max_position
    packs = [_pack_chat(tok, split) for split in (data.train, data.val, data.eval)]
    longest = max(ids_NL.shape[1] for ids_NL, _ in packs)
    if longest > model_cfg.max_position:
        raise ValueError(
            f"model.max_position={model_cfg.max_position} is shorter than the task's longest "
            f"chat sequence ({longest} tokens: templated prompt, completion and eos); raise model.max_position"
        )
    prompt_lengths = [len(encode_chat_prompt(tok, ex.prompt)) for ex in (*data.train, *data.val, *data.eval)]
    answer_lengths = sorted(
        {len(tok(completion_text(ex.answer), add_special_tokens=False)["input_ids"]) + 1 for ex in data.train}
    )

    with _torch_threads(model_cfg.build_threads), torch.random.fork_rng(devices=[]):
        model = new_hf_model(
            "qwen2",
            tok,
            hidden=model_cfg.hidden_size,
            layers=model_cfg.num_layers,
            heads=model_cfg.num_heads,
            intermediate=model_cfg.intermediate_size,
            max_position=model_cfg.max_position,
            seed=model_cfg.seed,
            eos_ids=eos_ids_for(tok, "chatml"),
        )
        steps, history = _warm_start(model, model_cfg, packs[0], packs[1])
        val_teacher_forced = _teacher_forced_exact_match(model, *packs[1])
        val_accuracy = chat_greedy_accuracy(model, tok, data.val)
        eval_accuracy = chat_greedy_accuracy(model, tok, data.eval)

    seconds = time.monotonic() - started
    log.info(
        "chat warm start done: %d steps, val accuracy %.3f, eval accuracy %.3f, %.1f s",
        steps,
        val_accuracy,
        eval_accuracy,
        seconds,
    )
    save_hf_model(model, tok, out_dir)
    record = {
        "steps": steps,
        "val_accuracy": val_accuracy,
        "val_accuracy_teacher_forced": val_teacher_forced,
        "eval_accuracy": eval_accuracy,
        "target_accuracy": model_cfg.warmstart_target_accuracy,
        "reached_target": val_teacher_forced >= model_cfg.warmstart_target_accuracy,
        "seconds": round(seconds, 3),
        "val_history": history,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "max_prompt_tokens": max(prompt_lengths),
        "completion_tokens_with_eos": answer_lengths,
        "build_version": CHAT_BUILD_VERSION,
        "kind": "chat",
    }
    (out_dir / WARMSTART_FILE).write_text(json.dumps(record, indent=2) + "\n")
