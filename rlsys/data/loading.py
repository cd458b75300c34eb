"""Reading prompt files into ``datasets`` (Arrow, memory-mapped), with errors that name the file.

``read_sources(cfg)`` returns the training and held-out :class:`Source` lists: one per file (or
per ``save_to_disk`` split), so that a bad row is reported as ``<file>: row N``. Formats come
from the file name: ``.jsonl``/``.json``/``.jsonl.gz``/``.json.gz`` (JSON lines or one JSON
array), ``.parquet``, ``.csv``, and a directory written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``.

Nothing here reaches the network: the ``datasets`` library is put in offline mode before it is
imported (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``, unless the environment already says).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlsys.data.config import EVAL_SPLITS, DataConfig
from rlsys.tasks.arithmetic import DatasetError  # one error type for every data problem

__all__ = ["DatasetError", "Source", "read_sources", "read_file", "offline_datasets"]

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
FORMATS = {".parquet": "parquet", ".csv": "csv"}


@dataclass
class Source:
    """Rows of one file (or one split of a ``save_to_disk`` directory)."""

    label: str
    """How errors name it: the file path, with the split for a DatasetDict (``dir[train]``)."""
    dataset: Any
    """A ``datasets.Dataset``."""
    split: Optional[str] = None
    """``train`` / ``eval`` when the split column decides per row (``None``: the whole source)."""


def offline_datasets():
    """The ``datasets`` module, imported in offline mode (nothing is fetched at run time)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def read_sources(cfg: DataConfig) -> tuple[list[Source], list[Source]]:
    """The training and held-out sources of ``cfg`` (see :class:`DataConfig` for the rules)."""
    train, held_out = [], []
    for path in DataConfig.paths(cfg.train_files):
        for split, source in _read(path, "data.train_files"):
            (held_out if split in EVAL_SPLITS else train).append(source)
    if cfg.eval_files is not None:
        held_out = [s for path in DataConfig.paths(cfg.eval_files) for _, s in _read(path, "data.eval_files")]
    elif not held_out:  # one table with a split column: each row says where it goes
        for s in train:
            if cfg.split_key in s.dataset.column_names:
                s.split = "by_column"
    if not train:
        raise DatasetError(
            f"data.train_files={cfg.train_files!r}: no training split found (a save_to_disk directory "
            "needs a 'train' split)"
        )
    return train, held_out


def _read(path: str, key: str) -> list[tuple[Optional[str], Source]]:
    """``[(split name or None, Source)]`` for one path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory ({key})")
    datasets = offline_datasets()
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - any failure here means "not a saved dataset"
            raise DatasetError(
                f"{p}: not a directory written by datasets' save_to_disk ({type(e).__name__}: {e}); "
                "give a .jsonl, .parquet or .csv file, or such a directory"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            return [(name, Source(f"{p}[{name}]", ds)) for name, ds in loaded.items()]
        return [(None, Source(str(p), loaded))]
    return [(None, Source(str(p), read_file(p)))]


def read_file(p: Path):
    """One file as a ``datasets.Dataset`` (its format from the suffix)."""
    datasets = offline_datasets()
    name = p.name.lower()
    if name.endswith(JSON_SUFFIXES):
        builder = "json"
    elif p.suffix.lower() in FORMATS:
        builder = FORMATS[p.suffix.lower()]
    else:
        raise DatasetError(
            f"{p}: unknown format {p.suffix!r}; rlsys reads {', '.join(JSON_SUFFIXES)}, .parquet, .csv "
            "and save_to_disk directories"
        )
    if builder in ("json", "csv"):
        _check_utf8(p)
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many kinds; we name the row when we can
        if builder == "json":
            _explain_json(p)
        raise DatasetError(f"{p}: cannot be read as {builder} ({type(e).__name__}: {_first_line(e)})") from None
    if len(ds) == 0:
        raise DatasetError(f"{p}: no rows")
    return ds


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _open_bytes(p: Path) -> bytes:
    data = p.read_bytes()
    return gzip.decompress(data) if p.name.lower().endswith(".gz") else data


def _check_utf8(p: Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line (pyarrow reads such bytes into
    strings that fail only later, far from the file)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    for lineno, line in enumerate(_open_bytes(p).split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{p}:{lineno}: invalid UTF-8 at byte {exc.start} of the line") from None


def _explain_json(p: Path) -> None:
    """Find why a JSON file failed to load and raise it with its line; return when nothing found."""
    raw = _open_bytes(p)
    if raw.lstrip().startswith(b"["):  # one JSON array
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{p}: invalid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        _check_row_types(p, ((i + 1, r) for i, r in enumerate(rows)), "row")
        return
    parsed = []
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{p}:{lineno}: invalid UTF-8 at byte {exc.start} of the line") from None
        if not line.strip():
            continue
        try:
            parsed.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not parsed:
        raise DatasetError(f"{p}: no rows (the file is empty or all blank lines)")
    _check_row_types(p, parsed, "line")


def _check_row_types(p: Path, rows, unit: str) -> None:
    """Rows must be objects, and a column keeps one JSON type (Arrow needs one type per column)."""
    first_type: dict[str, tuple[str, int]] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{p}:{where}: a row must be a JSON object, got {_json_type(row)}")
        for key, value in row.items():
            kind = _json_type(value)
            if kind == "null":
                continue
            seen = first_type.setdefault(key, (kind, where))
            if {seen[0], kind} <= {"int", "float"}:
                continue
            if seen[0] != kind:
                raise DatasetError(
                    f"{p}:{where}: field {key!r} is {kind}, but {seen[0]} at {unit} {seen[1]}; a column must "
                    "keep one type"
                )


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)
