"""The locally built tiny causal LM: tokenizer, model, supervised warm start and on-disk cache.

Nothing is downloaded. :func:`ensure_model` returns a Hugging Face model directory (weights in
safetensors, ``config.json``, tokenizer files) that transformers' ``Auto*`` classes and vLLM
load as they would any Llama checkpoint::

    ensure_model(ModelConfig(), TaskConfig())
      -> cache hit: <cache_dir>/<key>/ holds DONE          -> return it
      -> miss:      tokenizer + random Llama (seeded)
                    -> supervised warm start on task.train (teacher forcing, loss on answer+eos)
                       every warmstart_eval_every steps: greedy accuracy on task.val
                       (by teacher forcing, one forward pass; see _teacher_forced_exact_match),
                       stop as soon as it reaches warmstart_target_accuracy
                    -> save into <cache_dir>/.tmp-<key>-*/ (model, tokenizer, warmstart.json),
                       DONE written last inside it
                    -> rename to <cache_dir>/<key>/  (the one commit point)

Why stop at a target: the policy should start weak but not hopeless (greedy eval accuracy
~10-40%), so that RL has both signal and room to improve. The supervised curve is a phase
transition: with the defaults, validation accuracy sits at 0-4% for ~700 steps, then goes
5% -> 18% -> 22% in 10 steps; where it happens moves by ~100 steps with the seed, so a fixed
step count overshoots or undershoots. warmstart.json records the steps taken, the greedy
val and eval accuracy reached (eval is informational: it never steers the build), seconds
and the validation history.

Cache invariants: the key is the sha256 of both configs (minus ``cache_dir``), the data file's
contents when ``task.data_path`` is set, and :data:`BUILD_VERSION`. A directory named by a key
is complete or absent: it appears only by an atomic rename of a finished temp directory, so
a crash leaves at most a ``.tmp-*`` directory and concurrent builders of the same key both
return the same, complete entry. Same configs give bit-identical weights (seeded RNG, one
torch thread during the build).

Tokenizer: one token per character of :data:`rlsys.tasks.arithmetic.ALPHABET` plus ``<pad>`` = 0,
``<bos>`` = 1 and ``<eos>`` = 2; encoding prepends ``<bos>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from rlsys.tasks.arithmetic import ALPHABET, Example, TaskConfig, load_task, verify_answer
from rlsys.tasks.config import ModelConfig

__all__ = [
    "BUILD_VERSION",
    "ModelConfig",
    "build_tokenizer",
    "decode_completion",
    "encode_prompt",
    "ensure_model",
    "greedy_accuracy",
    "greedy_generate",
]

log = logging.getLogger(__name__)

BUILD_VERSION = 1
"""Part of the cache key: bump it whenever the build recipe changes what it produces."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
"""Special tokens, with ids 0, 1, 2 in this order."""
DONE_MARKER = "DONE"
WARMSTART_FILE = "warmstart.json"


# ----------------------------------------------------------------------------- tokenizer


def progress_bar(total: int, desc: str):
    """A tqdm bar on an interactive terminal; a no-op in logs, CI and Ray workers."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not sys.stderr.isatty(), leave=False)


def build_tokenizer(max_length: int = 64) -> PreTrainedTokenizerFast:
    """The character-level tokenizer: specials ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, then
    one token per character of :data:`ALPHABET`; encoding prepends ``<bos>``."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: Path) -> None:
    """``save_pretrained``, naming the class portably so that transformers 4.x loads it too."""
    tok.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def encode_prompt(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of a prompt, starting with ``<bos>``. Raises ValueError for characters the
    tokenizer has no token for."""
    vocab = tok.get_vocab()
    bad = sorted({ch for ch in text if ch not in vocab})
    if bad:
        raise ValueError(f"prompt {text!r} has characters the tokenizer cannot encode: {''.join(bad)!r}")
    return list(tok(text)["input_ids"])


def decode_completion(tok: PreTrainedTokenizerFast, ids: Sequence[int]) -> str:
    """Text of generated ids: everything before the first ``<eos>``, special tokens dropped."""
    ids = list(ids)
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int,
    batch_size: int = 256,
) -> list[list[int]]:
    """Greedy completions (ids, ending with eos when one was produced) of each prompt.

    Prompts are batched by length, so no padding or attention mask is needed and each row
    is computed as it would be alone. Decoding uses the KV cache (completions of the counting
    task run to ~250 tokens: without it, evaluation is quadratic in their length).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    try:
        for length in sorted(by_length):
            rows = by_length[length]
            for start in range(0, len(rows), batch_size):
                idx = rows[start : start + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
                done = torch.zeros(len(idx), dtype=torch.bool, device=device)
                new_tokens, past = [], None
                for _ in range(max_new_tokens):
                    out_step = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
                    past = out_step.past_key_values
                    next_ids = out_step.logits[:, -1, :].argmax(dim=-1)
                    new_tokens.append(next_ids)
                    ids = next_ids[:, None]
                    done |= next_ids == eos_token_id
                    if bool(done.all()):
                        break
                if not new_tokens:
                    continue
                for i, row in zip(idx, torch.stack(new_tokens, dim=1).tolist()):
                    out[i] = row[: row.index(eos_token_id) + 1] if eos_token_id in row else row
    finally:
        model.train(was_training)
    return out


def greedy_accuracy(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, examples: Sequence[Example], batch_size: int = 256
) -> float:
    """Fraction of examples whose greedy completion :func:`verify_answer` accepts.

    Completions are cut at one token more than the longest answer (room for eos).
    """
    if not examples:
        raise ValueError("greedy_accuracy needs at least one example")
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples]
    max_new_tokens = max(len(tok(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples) + 1
    completions = greedy_generate(model, prompts, max_new_tokens, tok.eos_token_id, batch_size)
    rewards = [verify_answer(decode_completion(tok, ids), ex.answer) for ids, ex in zip(completions, examples)]
    return sum(rewards) / len(rewards)


# ----------------------------------------------------------------------------- building


def ensure_model(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Path:
    """Directory of the policy model: ``model_cfg.path`` if set, else the cached (or newly
    built and warm-started) tiny model for these configs. See the module docstring;
    :func:`rlsys.tasks.models.ensure_model` also builds the ``model.kind="chat"`` model."""
    if model_cfg.path is not None:
        path = Path(model_cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={model_cfg.path!r} is not a model directory (no config.json)")
        return path
    return cached_build(
        Path(model_cfg.cache_dir).expanduser(),
        cache_key(model_cfg, task_cfg),
        lambda out: _build(model_cfg, task_cfg, out),
        "tiny model",
    )


def cached_build(cache_dir: Path, key: str, build: Callable[[Path], object], what: str) -> Path:
    """``cache_dir/key``, building it first with ``build(tmp_dir)`` when absent. The entry
    appears only by an atomic rename of a finished build holding a DONE marker (see the
    module docstring), so a crash or a concurrent builder never leaves a half-written one.
    Shared by every locally built artefact (the tiny policy, the reward models)."""
    final = cache_dir / key
    if (final / DONE_MARKER).is_file():
        log.info("%s cache hit: %s", what, final)
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
    try:
        log.info("building %s %s (cache miss)", what, key)
        build(tmp)
        (tmp / DONE_MARKER).write_text(key + "\n")
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def config_key(build_version: int, name: str, cfg, task_cfg: TaskConfig) -> str:
    """sha256 of a build's config (minus ``cache_dir``), the task config, the task data file's
    contents when ``task.data_path`` is set, and the recipe's build version."""
    fields = dataclasses.asdict(cfg)
    fields.pop("cache_dir")
    payload = {"build_version": build_version, name: fields, "task": dataclasses.asdict(task_cfg)}
    if task_cfg.data_path is not None:
        data = Path(task_cfg.data_path).expanduser()
        payload["task_data_sha256"] = hashlib.sha256(data.read_bytes()).hexdigest() if data.is_file() else None
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_key(model_cfg: ModelConfig, task_cfg: TaskConfig) -> str:
    """sha256 naming the cache entry of these configs (see the module docstring)."""
    return config_key(BUILD_VERSION, "model", model_cfg, task_cfg)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically rename a finished build into place. If another builder won the race, its
    complete entry stays (``tmp`` is left for the caller to delete); an incomplete leftover
    at ``final`` (no DONE: not written by this module) is moved aside and replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if (final / DONE_MARKER).is_file():
                log.info("another builder published %s first; using it", final)
                return
        log.warning("replacing an incomplete cache entry at %s", final)
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=final.parent))
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, stale / final.name)
        shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not publish the model build {tmp} at {final}")


@contextlib.contextmanager
def _torch_threads(n: int = 1) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build(model_cfg: ModelConfig, task_cfg: TaskConfig, out_dir: Path) -> None:
    started = time.monotonic()
    data = load_task(task_cfg)
    tok = build_tokenizer(model_cfg.max_position)
    train_pack, val_pack, eval_pack = (_pack(tok, split) for split in (data.train, data.val, data.eval))
    longest = max(ids_NL.shape[1] for ids_NL, _ in (train_pack, val_pack, eval_pack))
    if longest > model_cfg.max_position:
        raise ValueError(
            f"model.max_position={model_cfg.max_position} is shorter than the task's longest "
            f"sequence ({longest} tokens with bos and eos); raise model.max_position"
        )

    with _torch_threads(model_cfg.build_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.seed)
        model = LlamaForCausalLM(_llama_config(model_cfg, tok))
        model.to(torch.float32)
        steps, history = _warm_start(model, model_cfg, train_pack, val_pack)
        val_accuracy = greedy_accuracy(model, tok, data.val)
        eval_accuracy = greedy_accuracy(model, tok, data.eval)

    seconds = time.monotonic() - started
    log.info(
        "warm start done: %d steps, val accuracy %.3f, eval accuracy %.3f, %.1f s",
        steps,
        val_accuracy,
        eval_accuracy,
        seconds,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tok, out_dir)
    record = {
        "steps": steps,
        "val_accuracy": val_accuracy,
        "eval_accuracy": eval_accuracy,
        "target_accuracy": model_cfg.warmstart_target_accuracy,
        "reached_target": val_accuracy >= model_cfg.warmstart_target_accuracy,
        "seconds": round(seconds, 3),
        "val_history": history,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "build_version": BUILD_VERSION,
    }
    (out_dir / WARMSTART_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _llama_config(model_cfg: ModelConfig, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_position,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


def _training_sequences(tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> tuple[list[list[int]], list[int]]:
    """``<bos> prompt answer <eos>`` ids and the prompt length (with bos) of each example."""
    vocab = tok.get_vocab()
    for ex in examples:
        bad = sorted({ch for ch in ex.prompt + ex.answer if ch not in vocab})
        if bad:
            raise ValueError(f"example {ex.id!r} has characters the tokenizer cannot encode: {''.join(bad)!r}")
    prompts = tok([ex.prompt for ex in examples])["input_ids"]
    answers = tok([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    sequences = [[*prompt, *answer, tok.eos_token_id] for prompt, answer in zip(prompts, answers)]
    return sequences, [len(prompt) for prompt in prompts]


def _pack(tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> prompt answer <eos>`` of each example, right-padded: (ids_NL, target_mask_NL).

    target_mask_NL marks the positions whose token is to be predicted (answer and eos). Right
    padding needs no attention mask: causal attention never lets a real token see a later pad.
    """
    sequences, prompt_lengths = _training_sequences(tok, examples)
    n, length = len(sequences), max(len(s) for s in sequences)
    ids_NL = torch.full((n, length), tok.pad_token_id, dtype=torch.long)
    target_mask_NL = torch.zeros((n, length), dtype=torch.bool)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        ids_NL[i, : len(seq)] = torch.tensor(seq)
        target_mask_NL[i, p : len(seq)] = True
    return ids_NL, target_mask_NL


@torch.no_grad()
def _teacher_forced_exact_match(model: PreTrainedModel, ids_NL: torch.Tensor, target_mask_NL: torch.Tensor) -> float:
    """Greedy accuracy computed in one forward pass: greedy decoding reproduces ``answer <eos>``
    exactly when the argmax at every target position equals the target token, given the
    (then identical) prefix. Differs from :func:`greedy_accuracy` only for completions that
    contain special tokens, which decoding drops; used for the frequent warm-start checks."""
    was_training = model.training
    model.eval()
    try:
        logits_NLV = model(input_ids=ids_NL[:, :-1], use_cache=False).logits  # V: vocabulary
    finally:
        model.train(was_training)
    hit_NL = (logits_NLV.argmax(dim=-1) == ids_NL[:, 1:]) | ~target_mask_NL[:, 1:]
    return int(hit_NL.all(dim=1).sum()) / ids_NL.shape[0]


def _warm_start(
    model: LlamaForCausalLM,
    cfg: ModelConfig,
    train_pack: tuple[torch.Tensor, torch.Tensor],
    val_pack: tuple[torch.Tensor, torch.Tensor],
) -> tuple[int, list[list[float]]]:
    """Teacher-forced training on answer+eos tokens until the validation target or the step cap.

    Takes :func:`_pack` output of the train and val splits. Returns (steps taken,
    [[step, validation accuracy], ...]).
    """
    ids_NL, target_mask_NL = train_pack
    n = ids_NL.shape[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(cfg.seed)
    perm, cursor = torch.randperm(n, generator=order), 0
    history: list[list[float]] = []
    step = 0
    model.train()
    bar = progress_bar(cfg.warmstart_max_steps, "warm start (stops at the target accuracy)")
    while step < cfg.warmstart_max_steps:
        if cursor + cfg.warmstart_batch_size > n:
            perm, cursor = torch.randperm(n, generator=order), 0
        batch = perm[cursor : cursor + cfg.warmstart_batch_size]
        cursor += cfg.warmstart_batch_size
        ids_BL, mask_BL = ids_NL[batch], target_mask_NL[batch]
        logits_BLV = model(input_ids=ids_BL[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits_BLV[mask_BL[:, 1:]], ids_BL[:, 1:][mask_BL[:, 1:]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update()
        if step % cfg.warmstart_eval_every == 0 or step == cfg.warmstart_max_steps:
            accuracy = _teacher_forced_exact_match(model, *val_pack)
            history.append([step, accuracy])
            bar.set_postfix(val_accuracy=f"{accuracy:.3f}")
            if len(history) % 10 == 0 or accuracy >= cfg.warmstart_target_accuracy:
                log.info("warm start step %d: loss %.4f, val accuracy %.3f", step, loss.item(), accuracy)
            if accuracy >= cfg.warmstart_target_accuracy:
                break
    bar.close()
    model.eval()
    return step, history
