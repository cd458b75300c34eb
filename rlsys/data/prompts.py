"""Prompts for the policy's own tokenizer: rows checked, chat template applied, tokenized in batches.

Every source (a user file, or the built-in task's rows) goes through one batched
``datasets.map``: each row's prompt (a string, or a list of ``{"role", "content"}`` messages) is
checked, rendered with the chat template (``add_generation_prompt``; a string prompt becomes one
user turn, ``data.system_prompt`` a leading system turn), and tokenized in one call per batch.
Rendered text is tokenized with ``add_special_tokens=False``: a template writes its own BOS, so
none is added twice; text without a template gets the tokenizer's usual specials. On disk-backed
datasets the result is cached (``~/.cache/rlsys/data``) under a fingerprint of the file, the
tokenizer and the settings: a second start on the same data does not tokenize again.

Then the rows become :class:`~rlsys.scheduling.scheduler.Prompt` objects: split into training
and held-out prompts, over-long ones dropped (counted) or refused, ids checked unique.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from rlsys.data.config import EVAL_SPLITS, DataConfig
from rlsys.data.loading import DatasetError, Source, offline_datasets, read_sources
from rlsys.scheduling.scheduler import Prompt

log = logging.getLogger(__name__)

__all__ = ["PromptSet", "build_prompts", "encode_source", "task_sources", "prepare_tokenizer", "ROLES"]

ROLES = ("system", "user", "assistant", "tool")
ENCODER_VERSION = 2
"""Part of the cache fingerprint: bump when the encoded columns change."""
CACHE_DIR = Path("~/.cache/rlsys/data")
COLUMNS = ("rlsys_id", "rlsys_text", "rlsys_ids", "rlsys_len", "rlsys_ref")
"""What the encoder adds per row (the source's own columns are read beside them, not copied)."""
ENCODE_THREADS = 2
"""Threads tokenizing a batch (the fast tokenizer releases the GIL). They matter when the
tokenizer's own parallelism is off (TOKENIZERS_PARALLELISM=false, as in the tests, or in a forked
map process): measured 2x one thread on 2 cores; with it on, both come out level."""
BATCH_ROWS = 4000
MAP_PROCESSES = max(1, min(8, os.cpu_count() or 1))
"""Processes of the batched map on a large file (checks, template and tokenizer are Python-bound
per row: one process per core)."""
PARALLEL_ROWS = 50_000


@dataclass
class PromptSet:
    """A run's prompts, tokenized."""

    train: list[Prompt]
    eval: list[Prompt]
    dropped_overlong: int = 0
    """Prompts dropped for leaving no room for the completion (``data.overlong_prompts=drop``)."""
    templated: bool = False
    """Whether prompts went through a chat template."""
    sources: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """For the run's summary."""
        return {
            "train_prompts": len(self.train),
            "eval_prompts": len(self.eval),
            "dropped_overlong": self.dropped_overlong,
            "chat_template": self.templated,
            "sources": list(self.sources),
        }


def prepare_tokenizer(tok, cfg: DataConfig):
    """Apply ``data.chat_template`` to ``tok``; returns whether prompts are rendered with a template."""
    mode = cfg.chat_template
    if mode == "none":
        return False
    if mode != "auto":
        path = Path(mode).expanduser()
        try:
            tok.chat_template = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"data.chat_template={mode}: cannot read the template ({e})") from None
    return bool(getattr(tok, "chat_template", None))


def task_sources(rows: Sequence, label: str) -> list[Source]:
    """The built-in task's :class:`~rlsys.tasks.arithmetic.Example` rows as one in-memory source."""
    datasets = offline_datasets()
    ds = datasets.Dataset.from_dict(
        {"id": [r.id for r in rows], "prompt": [r.prompt for r in rows], "answer": [r.answer for r in rows]}
    )
    return [Source(label, ds)]


def build_prompts(cfg: DataConfig, tok, max_prompt_tokens: int, sources=None, held_out=None) -> PromptSet:
    """Read (unless ``sources``/``held_out`` are given), check, render and tokenize the prompts."""
    if sources is None:
        sources, held_out = read_sources(cfg)
    templated = prepare_tokenizer(tok, cfg)
    encoder = _Encoder(tok, cfg, templated)
    train, held, dropped = [], [], 0
    for group, out in ((sources, train), (held_out or [], held)):
        for src in group:
            rows = encode_source(src, encoder)
            kept, n_dropped = _fit(rows, src, cfg, max_prompt_tokens)
            dropped += n_dropped
            for prompt, split in kept:
                if src.split is None:
                    out.append(prompt)
                elif split == "train":
                    train.append(prompt)
                elif split in EVAL_SPLITS:
                    held.append(prompt)
                else:
                    raise DatasetError(
                        f"{src.label}: prompt {prompt.prompt_id!r}: field {cfg.split_key!r} must be 'train' or "
                        f"one of {list(EVAL_SPLITS)}, got {split!r}"
                    )
    if dropped:
        log.warning(
            "dropped %d prompt(s) longer than the %d tokens that leave room for rollout.max_new_tokens "
            "(data.overlong_prompts=error refuses them instead)",
            dropped,
            max_prompt_tokens,
        )
    if not held and cfg.eval_size:
        random.Random(cfg.seed).shuffle(train)
        held, train = train[: cfg.eval_size], train[cfg.eval_size :]
    labels = [s.label for s in sources]
    if not train:
        raise DatasetError(f"{', '.join(labels)}: no training prompts left{_after(dropped)}")
    if not held:
        raise DatasetError(
            f"{', '.join(labels)}: no held-out prompts{_after(dropped)}; give data.eval_files, a "
            f"'{cfg.split_key}' column with eval/test rows, or data.eval_size=N"
        )
    _check_unique([train, held], derived=cfg.id_key is None)
    if cfg.max_eval_prompts:
        held = held[: cfg.max_eval_prompts]
    return PromptSet(train, held, dropped, templated, labels)


def _after(dropped: int) -> str:
    return f" after dropping {dropped} over-long prompt(s)" if dropped else ""


def encode_source(src: Source, encoder: "_Encoder"):
    """The source's rows encoded (a ``datasets.Dataset`` with :data:`COLUMNS`)."""
    ds = src.dataset
    encoder.check_columns(ds.column_names, src.label)
    kwargs: dict[str, Any] = dict(
        batched=True, batch_size=BATCH_ROWS, with_indices=True, remove_columns=ds.column_names
    )
    if ds.cache_files:  # a file on disk: cache the encoded rows next to it, keyed by everything that matters
        fp = encoder.fingerprint(ds._fingerprint)
        cache = CACHE_DIR.expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        kwargs.update(new_fingerprint=fp, cache_file_name=str(cache / f"{fp}.arrow"), load_from_cache_file=True)
        if len(ds) >= PARALLEL_ROWS and MAP_PROCESSES > 1:
            kwargs.update(num_proc=MAP_PROCESSES)
    else:
        kwargs.update(keep_in_memory=True)
    encoder.label = src.label
    return ds.map(encoder, **kwargs)


def _fit(rows, src: Source, cfg: DataConfig, limit: int) -> tuple[list[tuple[Prompt, str]], int]:
    """Prompt objects of the encoded rows that fit in ``limit`` tokens (with their split column's
    value, "" without one), and how many did not."""
    label = src.label
    enc = rows.with_format("arrow")[:]
    own = src.dataset.with_format("arrow")[:]
    lengths = enc.column("rlsys_len").to_pylist()
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over and cfg.overlong_prompts == "error":
        i = over[0]
        raise DatasetError(
            f"{label}: row {i + 1}: prompt has {lengths[i]} tokens, more than the {limit} that fit before "
            "rollout.max_new_tokens in the model's context; shorten it, raise rollout.max_model_len, "
            "or set data.overlong_prompts=drop"
        )
    ids, texts, refs = (enc.column(c).to_pylist() for c in ("rlsys_id", "rlsys_text", "rlsys_ref"))
    token_ids = _token_arrays(enc.column("rlsys_ids"))
    raws = own.column(cfg.prompt_key).to_pylist()
    split = own.column(cfg.split_key).to_pylist() if src.split == "by_column" else None
    skip = {cfg.prompt_key, cfg.answer_key, cfg.id_key, cfg.split_key}
    meta_cols = {c: _column_values(own.column(c)) for c in own.column_names if c not in skip}
    out, dropped = [], set(over)
    for i in range(len(lengths)):
        if i in dropped:
            continue
        meta = {c: v[i] for c, v in meta_cols.items()}
        prompt = Prompt(ids[i], texts[i], token_ids[i], refs[i], raw_prompt=raws[i], meta=meta)
        out.append((prompt, "" if split is None else split[i]))
    return out, len(over)


def _token_arrays(col) -> list:
    """A list<int> column as one compact ``array('i')`` per row: 4 bytes a token instead of a
    Python int object and a tuple slot (200,000 prompts of 150 tokens: ~0.1 GB, not ~1.1 GB)."""
    from array import array

    import numpy as np
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = memoryview(np.ascontiguousarray(arr.flatten().to_numpy(), dtype=np.int32)).cast("B")
    offsets = (arr.offsets.to_numpy() - arr.offsets[0].as_py()).tolist()
    out = []
    for a, b in zip(offsets, offsets[1:]):
        row = array("i")
        row.frombytes(flat[4 * a : 4 * b])
        out.append(row)
    return out


def _column_values(col) -> list:
    """A metadata column as values the replay codec carries: JSON-like types kept, NaN as None,
    anything else (timestamps, bytes, decimals) as its string."""
    import pyarrow as pa

    t = col.type
    if pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
        return col.to_pylist()
    return [_plain(v) for v in col.to_pylist()]


def _check_unique(lists: list[list[Prompt]], derived: bool) -> None:
    """Ids unique across ``lists`` (changed in place): a repeated derived id (the same prompt
    twice) gets a suffix; a repeated given id is an error."""
    seen: dict[str, int] = {}
    for prompts in lists:
        for i, p in enumerate(prompts):
            if p.prompt_id not in seen:
                seen[p.prompt_id] = 0
                continue
            if not derived:
                raise DatasetError(
                    f"prompt id {p.prompt_id!r} appears more than once (data.id_key); ids must be unique"
                )
            seen[p.prompt_id] += 1
            prompts[i] = replace(p, prompt_id=f"{p.prompt_id}~{seen[p.prompt_id]}")


class _Encoder:
    """The batched ``datasets.map`` function (one per run; ``label`` names the source in errors)."""

    def __init__(self, tok, cfg: DataConfig, templated: bool):
        self.tok, self.cfg, self.templated = tok, cfg, templated
        self.label = ""
        self.charset = _closed_charset(tok)

    def check_columns(self, columns: list[str], label: str) -> None:
        for key, name in (("prompt_key", self.cfg.prompt_key), ("answer_key", self.cfg.answer_key)):
            if name not in columns:
                raise DatasetError(
                    f"{label}: no column {name!r} (data.{key}); its columns are {columns}: set data.{key}"
                )
        if self.cfg.id_key is not None and self.cfg.id_key not in columns:
            raise DatasetError(f"{label}: no column {self.cfg.id_key!r} (data.id_key); its columns are {columns}")

    def fingerprint(self, data_fp: str) -> str:
        tok = self.tok
        h = hashlib.sha256()
        parts = [
            str(ENCODER_VERSION),
            data_fp,
            tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok.get_vocab()),
            str(getattr(tok, "chat_template", None)),
            json.dumps(tok.all_special_tokens),
            json.dumps([self.templated, self.cfg.prompt_key, self.cfg.answer_key, self.cfg.id_key]),
            json.dumps([self.cfg.split_key, self.cfg.system_prompt]),
        ]
        for part in parts:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:32]

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        cfg = self.cfg
        refs, ids, convs, texts = [], [], [], []
        for j, row in enumerate(indices):
            where = f"{self.label}: row {row + 1}"
            raw = batch[cfg.prompt_key][j]
            conv = self._conversation(raw, where)
            refs.append(_reference(batch[cfg.answer_key][j], where, cfg.answer_key))
            if cfg.id_key is not None:
                pid = batch[cfg.id_key][j]
                if pid is None or (isinstance(pid, str) and not pid.strip()):
                    raise DatasetError(f"{where}: field {cfg.id_key!r} (data.id_key) is empty")
                ids.append(str(pid))
            if self.templated:
                convs.append(conv)
            else:
                texts.append(raw)
        if self.templated:
            texts = self.tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        elif self.charset is not None:
            for j, text in enumerate(texts):
                bad = sorted(set(text) - self.charset)
                if bad:
                    raise DatasetError(
                        f"{self.label}: row {indices[j] + 1}: field {cfg.prompt_key!r} has characters the "
                        f"tokenizer has no token for: {''.join(bad)!r} (a word-level tokenizer, such as the "
                        "built-in tiny model's, reads only its own alphabet: set model.path to your model)"
                    )
        if cfg.id_key is None:  # stable across runs and row order: the content, as the policy sees it
            ids = [hashlib.sha1(f"{t}\0{r}".encode()).hexdigest()[:16] for t, r in zip(texts, refs)]
        enc = self.encode(texts)
        return {
            "rlsys_id": ids,
            "rlsys_text": texts,
            "rlsys_ids": enc,
            "rlsys_len": [len(e) for e in enc],
            "rlsys_ref": refs,
        }

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts``: rendered text without added specials (the template wrote them),
        plain text with the tokenizer's own; split over threads for a fast tokenizer."""
        specials = not self.templated
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or len(texts) < 2 * ENCODE_THREADS:
            return self.tok(texts, add_special_tokens=specials)["input_ids"]
        step = -(-len(texts) // ENCODE_THREADS)
        chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(len(chunks)) as pool:
            parts = pool.map(lambda c: [e.ids for e in backend.encode_batch(c, add_special_tokens=specials)], chunks)
            return [ids for part in parts for ids in part]

    def _conversation(self, raw, where: str) -> Optional[list[dict]]:
        """The messages the template renders (None without a template); raises on a bad prompt."""
        key = self.cfg.prompt_key
        if isinstance(raw, str):
            if not raw.strip():
                raise DatasetError(f"{where}: field {key!r} is empty")
            if not self.templated:
                if self.cfg.system_prompt:
                    raise DatasetError(
                        f"data.system_prompt is set but the tokenizer has no chat template to put it in "
                        f"({self.label}); give one with data.chat_template=PATH"
                    )
                return None
            conv = [{"role": "user", "content": raw}]
        elif isinstance(raw, list):
            if not self.templated:
                raise DatasetError(
                    f"{where}: field {key!r} is a list of messages, but "
                    + (
                        "data.chat_template=none"
                        if self.cfg.chat_template == "none"
                        else "the tokenizer has no chat template"
                    )
                    + "; give a template with data.chat_template=PATH (a Jinja file)"
                )
            if not raw:
                raise DatasetError(f"{where}: field {key!r} is an empty list of messages")
            conv = []
            for k, m in enumerate(raw):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise DatasetError(f"{where}: field {key!r}[{k}] must be an object with 'role' and 'content'")
                if m["role"] not in ROLES:
                    raise DatasetError(
                        f"{where}: field {key!r}[{k}] has role {m['role']!r}; roles are {', '.join(ROLES)}"
                    )
                if not isinstance(m["content"], str):
                    raise DatasetError(
                        f"{where}: field {key!r}[{k}] content must be a string, got {_kind(m['content'])}"
                    )
                conv.append({"role": m["role"], "content": m["content"]})
        else:
            raise DatasetError(
                f"{where}: field {key!r} must be a string or a list of messages, got {_kind(raw)}"
                + (" (the column is missing in this row)" if raw is None else "")
            )
        if self.cfg.system_prompt and conv[0]["role"] != "system":
            conv.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return conv


def _reference(value, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"{where}: field {key!r} must be a string or a number, got {_kind(value)}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DatasetError(f"{where}: field {key!r} is {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    raise DatasetError(f"{where}: field {key!r} must be a string or a number, got {_kind(value)}")


def _plain(value):
    """A metadata value the replay codec carries (str/int/float/bool/None/list/dict)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _kind(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _closed_charset(tok) -> Optional[set[str]]:
    """For a word-level tokenizer without an unknown token (the tiny model's), the characters it
    can encode; None for every other tokenizer (byte-level BPE encodes any text)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "WordLevel" or model.get("unk_token") in model.get("vocab", {}):
        return None
    return {t for t in model["vocab"] if len(t) == 1}
