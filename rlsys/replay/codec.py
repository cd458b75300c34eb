"""The replay codec: ``encode_group`` / ``decode_group`` between a :class:`~rlsys.records.Group` and
one self-describing record (the layout, limits and checksum are rlsys/replay/record_format.py).

Never pickle: a record crosses a network boundary (Redis), so decoding reads msgpack with no
object hooks and no extension types, checks every field's type, dtype, length and limit, and
raises a :class:`CodecError` subclass that names the field; nothing in a record can run code.
Encoding checks the group as strictly (the codec never casts), so a bad group fails at the
producer, not at the learner.
"""

from __future__ import annotations

import struct
from typing import Any, NoReturn

import msgpack
import numpy as np

from rlsys.records import Completion, Group
from rlsys.replay.record_format import (
    CODEC_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_ARRAY_LEN,
    MAX_BIN_LEN,
    MAX_MAP_LEN,
    MAX_META_DEPTH,
    MAX_PAYLOAD,
    MAX_STR_LEN,
    CodecError,
    CorruptRecordError,
    TruncatedRecordError,
    UnencodableGroupError,
    UnsupportedVersionError,
    checksum,
)

# Wire dtype string -> (wire dtype, native dtype). Anything else is refused on decode.
_WIRE_DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    "<i4": (np.dtype("<i4"), np.dtype(np.int32)),
    "<i8": (np.dtype("<i8"), np.dtype(np.int64)),
    "<f4": (np.dtype("<f4"), np.dtype(np.float32)),
}
_ALLOWED = ", ".join(repr(k) for k in _WIRE_DTYPES)
_I32, _F32 = np.dtype(np.int32), np.dtype(np.float32)
_LE_I32, _LE_F32 = np.dtype("<i4"), np.dtype("<f4")  # the native singletons on a little-endian host
_FAST_STR_LEN = MAX_STR_LEN // 4  # a str at most this long has at most MAX_STR_LEN UTF-8 bytes
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
_COMPLETIONS_KEYS = frozenset({"lengths", "token_ids", "logprobs", "text", "finish_reason"})
_GROUP_KEYS = frozenset(
    {
        "group_id",
        "prompt_id",
        "prompt",
        "prompt_token_ids",
        "reference",
        "policy_version",
        "completions",
        "rewards",
        "reward_failures",
        "meta",
    }
)
_GROUP_KEYS_V2 = _GROUP_KEYS | {"advantages"}
_KEYS_BY_VERSION = {1: _GROUP_KEYS, 2: _GROUP_KEYS_V2, 3: _GROUP_KEYS_V2}
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what a msgpack int can carry
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _tname(x: Any) -> str:
    return "None" if x is None else type(x).__name__


# ---------------------------------------------------------------------------------- encode


def encode_group(group: Group) -> bytes:
    """Serialise ``group`` to one self-checking record (header + msgpack payload).

    Raises ``UnencodableGroupError`` naming the field if the group does not match
    ``records.py`` (types; int32/float32 1-D arrays; ``len(token_ids) == len(logprobs)``;
    ``len(rewards) == len(completions)``), exceeds a limit, or ``meta`` holds a value that
    would not come back equal (a tuple, bytes, a numpy scalar other than float64, ...).
    """
    if not isinstance(group, Group):
        raise UnencodableGroupError(f"encode_group needs an rlsys.records.Group, got {_tname(group)}")
    comps = group.completions
    if not isinstance(comps, list):
        raise UnencodableGroupError(f"completions must be a list of Completion, got {_tname(comps)}")
    if len(comps) > MAX_ARRAY_LEN:
        raise UnencodableGroupError(
            f"the group has {len(comps)} completions, more than the codec's limit of {MAX_ARRAY_LEN}; split it"
        )
    toks, lps, lengths, texts, finishes = [], [], [], [], []
    for i, c in enumerate(comps):
        if type(c) is not Completion:
            _check_completion(i, c)  # raises unless c is a Completion subclass
        tok, lp, text, finish = c.token_ids, c.logprobs, c.text, c.finish_reason
        # The common case, inline because it runs per completion; anything else gets the full check.
        if not (
            type(tok) is np.ndarray
            and tok.dtype is _LE_I32
            and tok.ndim == 1
            and type(lp) is np.ndarray
            and lp.dtype is _LE_F32
            and lp.ndim == 1
            and len(tok) == len(lp)
            and type(text) is str
            and len(text) <= _FAST_STR_LEN
            and type(finish) is str
            and len(finish) <= _FAST_STR_LEN
        ):
            _check_completion(i, c)
        toks.append(tok)
        lps.append(lp)
        lengths.append(len(tok))
        texts.append(text)
        finishes.append(finish)
    token_ids = _concat(toks, "<i4")
    if token_ids.nbytes > MAX_BIN_LEN:
        raise UnencodableGroupError(
            f"the group's completions hold {len(token_ids)} tokens, more than the codec's "
            f"limit of {MAX_BIN_LEN // 4}; split the group"
        )
    rewards = group.rewards
    if rewards is not None:
        rewards = _encode_array(_check_array(rewards, _F32, "rewards"), "<f4")
        if len(group.rewards) != len(comps):
            raise UnencodableGroupError(
                f"rewards has {len(group.rewards)} entries but the group has {len(comps)} "
                f"completions; there must be one reward per completion"
            )
    advantages = group.advantages
    if advantages is not None:
        advantages = _encode_array(_check_array(advantages, _F32, "advantages"), "<f4")
        if len(group.advantages) != len(comps):
            raise UnencodableGroupError(
                f"advantages has {len(group.advantages)} entries but the group has "
                f"{len(comps)} completions; there must be one per completion"
            )
    if not isinstance(group.meta, dict):
        raise UnencodableGroupError(f"meta must be a dict, got {_tname(group.meta)}")
    if group.meta:
        _check_meta(group.meta, "meta", 0, UnencodableGroupError)
    payload = {
        "group_id": _check_str(group.group_id, "group_id"),
        "prompt_id": _check_str(group.prompt_id, "prompt_id"),
        "prompt": _check_str(group.prompt, "prompt"),
        "prompt_token_ids": _encode_prompt_ids(group.prompt_token_ids),
        "reference": _check_str(group.reference, "reference"),
        "policy_version": _check_int(group.policy_version, "policy_version"),
        "completions": {
            "lengths": lengths,
            "token_ids": _encode_array(token_ids, "<i4"),
            "logprobs": _encode_array(_concat(lps, "<f4"), "<f4"),
            "text": texts,
            "finish_reason": finishes,
        },
        "rewards": rewards,
        "advantages": advantages,
        "reward_failures": _check_int(group.reward_failures, "reward_failures"),
        "meta": group.meta,
    }
    try:
        body = msgpack.packb(payload, use_bin_type=True)
    except UnicodeEncodeError as e:  # a lone surrogate in a str field (meta was checked above)
        raise UnencodableGroupError(
            f"{_find_bad_text(group)} is not valid Unicode ({e.reason}) and cannot be written as UTF-8"
        ) from e
    if len(body) > MAX_PAYLOAD:
        raise UnencodableGroupError(
            f"the group encodes to {len(body)} bytes, more than a record can hold ({MAX_PAYLOAD}); split it"
        )
    return HEADER.pack(MAGIC, CODEC_VERSION, len(body), checksum(body, CODEC_VERSION)) + body


def _check_completion(i: int, c: Any) -> None:
    """Full checks of ``completions[i]``, raising with a message that names the field."""
    if not isinstance(c, Completion):
        raise UnencodableGroupError(f"completions[{i}] must be a Completion, got {_tname(c)}")
    tok = _check_array(c.token_ids, _I32, f"completions[{i}].token_ids")
    lp = _check_array(c.logprobs, _F32, f"completions[{i}].logprobs")
    if len(tok) != len(lp):
        raise UnencodableGroupError(
            f"completions[{i}] has {len(tok)} token_ids but {len(lp)} logprobs; there must be one logprob per token"
        )
    _check_str(c.text, f"completions[{i}].text")
    _check_str(c.finish_reason, f"completions[{i}].finish_reason")


def _check_array(a: Any, dtype: np.dtype, path: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise UnencodableGroupError(f"{path} must be a 1-D numpy {dtype.name} array, got {_tname(a)}")
    if a.dtype.type is not dtype.type:
        raise UnencodableGroupError(
            f"{path} has dtype {a.dtype.name}, but must be {dtype.name} "
            f"(build it with np.asarray(..., np.{dtype.name}); the codec never casts)"
        )
    if a.ndim != 1:
        raise UnencodableGroupError(f"{path} must be 1-D, got shape {a.shape}")
    if a.nbytes > MAX_BIN_LEN:
        raise UnencodableGroupError(f"{path} is {a.nbytes} bytes, more than the codec's limit of {MAX_BIN_LEN}")
    return a


def _concat(arrays: list[np.ndarray], wire: str) -> np.ndarray:
    """One contiguous little-endian column from checked arrays of one dtype (any strides or byte order)."""
    if not arrays:
        return np.zeros(0, wire)
    return np.ascontiguousarray(np.concatenate(arrays), dtype=wire)  # no second copy on little-endian hosts


def _encode_array(a: np.ndarray, wire: str) -> dict:
    a = np.ascontiguousarray(a, dtype=wire)  # no copy for a contiguous little-endian array
    return {"dtype": wire, "shape": [a.shape[0]], "data": a.data}


def _encode_prompt_ids(ids: Any) -> dict:
    if not isinstance(ids, tuple):
        raise UnencodableGroupError(f"prompt_token_ids must be a tuple of int, got {_tname(ids)}")
    if len(ids) * 8 > MAX_BIN_LEN:
        raise UnencodableGroupError(
            f"prompt_token_ids has {len(ids)} tokens, more than the codec's limit of {MAX_BIN_LEN // 8}"
        )
    try:
        data = struct.pack(f"<{len(ids)}q", *ids)  # takes int-likes in int64 range only
    except struct.error as e:
        bad = next((t for t in ids if not isinstance(t, (int, np.integer)) or not _I64_MIN <= t <= _I64_MAX), None)
        raise UnencodableGroupError(
            f"prompt_token_ids must be a tuple of int in int64 range, found {bad!r} ({_tname(bad)})"
        ) from e
    return {"dtype": "<i8", "shape": [len(ids)], "data": data}


def _check_str(s: Any, path: str) -> str:
    if not isinstance(s, str):
        raise UnencodableGroupError(f"{path} must be a str, got {_tname(s)}")
    if len(s) > _FAST_STR_LEN and len(s.encode("utf-8", "surrogatepass")) > MAX_STR_LEN:
        raise UnencodableGroupError(f"{path} is longer than the codec's limit of {MAX_STR_LEN} UTF-8 bytes")
    return s


def _check_int(v: Any, path: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise UnencodableGroupError(f"{path} must be an int, got {_tname(v)}")
    v = int(v)
    if not _INT_MIN <= v <= _INT_MAX:
        raise UnencodableGroupError(f"{path} = {v} is outside the range a record can carry [{_INT_MIN}, {_INT_MAX}]")
    return v


def _find_bad_text(group: Group) -> str:
    fields = [
        ("group_id", group.group_id),
        ("prompt_id", group.prompt_id),
        ("prompt", group.prompt),
        ("reference", group.reference),
    ]
    for i, c in enumerate(group.completions):
        fields += [(f"completions[{i}].text", c.text), (f"completions[{i}].finish_reason", c.finish_reason)]
    for path, s in fields:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return path
    return "a string field"


# ------------------------------------------------------------------------------------ meta


def _check_meta(x: Any, path: str, depth: int, error: type[CodecError]) -> None:
    """Refuse anything in ``meta`` that would not come back equal and of the same kind.

    Allowed: str, int (in msgpack's range), float, bool, None, and list and dict (str keys)
    nested at most ``MAX_META_DEPTH`` deep. Refused: tuples (they would come back as
    lists), bytes, sets, numpy scalars other than float64, every other object. The encoder
    raises ``UnencodableGroupError``, the decoder ``CorruptRecordError``.
    """
    if isinstance(x, dict):
        if depth >= MAX_META_DEPTH:
            raise error(f"{path} is nested more than {MAX_META_DEPTH} levels deep")
        if len(x) > MAX_MAP_LEN:
            raise error(f"{path} has {len(x)} keys, more than the codec's limit of {MAX_MAP_LEN}")
        for k, v in x.items():
            if not isinstance(k, str):
                raise error(f"{path} has key {k!r} of type {_tname(k)}; meta keys must be str")
            _check_meta_str(k, f"{path} key {k!r}", error)
            _check_meta(v, f"{path}[{k!r}]", depth + 1, error)
    elif isinstance(x, list):
        if depth >= MAX_META_DEPTH:
            raise error(f"{path} is nested more than {MAX_META_DEPTH} levels deep")
        if len(x) > MAX_ARRAY_LEN:
            raise error(f"{path} has {len(x)} items, more than the codec's limit of {MAX_ARRAY_LEN}")
        for i, v in enumerate(x):
            _check_meta(v, f"{path}[{i}]", depth + 1, error)
    elif isinstance(x, str):
        _check_meta_str(x, path, error)
    elif isinstance(x, int) and not isinstance(x, bool):
        if not _INT_MIN <= x <= _INT_MAX:
            raise error(f"{path} = {x} is outside the integer range a record can carry [{_INT_MIN}, {_INT_MAX}]")
    elif x is None or isinstance(x, (bool, float)):
        pass
    else:
        hint = (
            " (use a list)"
            if isinstance(x, tuple)
            else " (convert numpy scalars with int(), float() or bool())"
            if isinstance(x, np.generic)
            else ""
        )
        raise error(
            f"{path} has type {_tname(x)}; meta values must be str, int, float, bool, None, list or dict "
            f"with str keys{hint}"
        )


def _check_meta_str(s: str, path: str, error: type[CodecError]) -> None:
    if s.isascii():
        n = len(s)
    else:
        try:
            n = len(s.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise error(f"{path} is not valid Unicode ({e.reason}) and cannot be written as UTF-8") from e
    if n > MAX_STR_LEN:
        raise error(f"{path} is {n} UTF-8 bytes, more than the codec's limit of {MAX_STR_LEN}")


# ---------------------------------------------------------------------------------- decode


def decode_group(data: bytes | bytearray | memoryview) -> Group:
    """Parse one record written by ``encode_group`` (any codec version up to ``CODEC_VERSION``).

    Raises ``TruncatedRecordError`` if the record is cut short, ``UnsupportedVersionError``
    if a newer rlsys wrote it, and ``CorruptRecordError`` for everything else that is wrong:
    bad magic, trailing bytes, CRC mismatch, malformed msgpack, a missing, unknown or
    ill-typed field, a disallowed dtype, inconsistent lengths.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        hint = (
            " (is the Redis client created with decode_responses=True? records are binary)"
            if isinstance(data, str)
            else ""
        )
        raise TypeError(f"decode_group needs bytes, got {_tname(data)}{hint}")
    view = data if isinstance(data, bytes) else memoryview(data).cast("B")
    n = len(view)
    if bytes(view[:3]) != MAGIC[:n]:
        raise CorruptRecordError(f"not a replay record: it starts with {bytes(view[:3])!r}, not the magic {MAGIC!r}")
    if n >= 4:
        _check_version(view[3])
    if n < HEADER_SIZE:
        raise TruncatedRecordError(
            f"record is {n} bytes, shorter than the {HEADER_SIZE}-byte header; "
            f"it was cut short (partial write or short read)"
        )
    _, version, length, crc = HEADER.unpack_from(view)
    got = n - HEADER_SIZE
    if got < length:
        raise TruncatedRecordError(
            f"record header declares a {length}-byte payload but only {got} bytes follow; "
            f"it was cut short (partial write or short read)"
        )
    if got > length:
        raise CorruptRecordError(
            f"record header declares a {length}-byte payload but {got} bytes follow "
            f"({got - length} trailing bytes: records concatenated, or a damaged length)"
        )
    body = memoryview(view)[HEADER_SIZE:]
    actual = checksum(body, version)
    if actual != crc:
        kind = "CRC32C" if version >= 3 else "CRC32"
        raise CorruptRecordError(
            f"payload checksum mismatch (header {kind} {crc:#010x}, payload {actual:#010x}): "
            f"the record was damaged in storage or transit"
        )
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_BIN_LEN,
            max_str_len=MAX_STR_LEN,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as e:  # FormatError, StackError, ExtraData, bad UTF-8, limits
        raise CorruptRecordError(f"payload is not valid msgpack within the codec's limits: {e}") from e
    return _decode_payload(obj, version)


def _check_version(version: int) -> None:
    if version > CODEC_VERSION:
        raise UnsupportedVersionError(
            f"record has codec version {version}; this rlsys reads versions "
            f"<= {CODEC_VERSION} — upgrade rlsys on this node"
        )
    if version < 1:
        raise CorruptRecordError(f"record has codec version {version}, which no rlsys ever wrote")


def _decode_payload(obj: Any, version: int) -> Group:
    """Versions 1 and 2 differ only in v2's ``advantages`` (array <f4 [n] | nil); 3 is 2's payload."""
    if type(obj) is not dict:
        raise CorruptRecordError(f"payload must be a map of group fields, got {_tname(obj)}")
    keys = _KEYS_BY_VERSION[version]
    if obj.keys() != keys:
        _key_mismatch(obj, keys, "payload")
    comps = _decode_completions(obj["completions"])
    rewards = obj["rewards"]
    if rewards is not None:
        rewards = _column(_array_data(rewards, "<f4", "rewards"), "<f4")
        if len(rewards) != len(comps):
            raise CorruptRecordError(f"field 'rewards' has {len(rewards)} entries for {len(comps)} completions")
    advantages = obj.get("advantages")
    if advantages is not None:
        advantages = _column(_array_data(advantages, "<f4", "advantages"), "<f4")
        if len(advantages) != len(comps):
            raise CorruptRecordError(f"field 'advantages' has {len(advantages)} entries for {len(comps)} completions")
    meta = obj["meta"]
    if type(meta) is not dict:
        raise CorruptRecordError(f"field 'meta' must be a map, got {_tname(meta)}")
    if meta:
        _check_meta(meta, "meta", 0, CorruptRecordError)
    prompt_ids = _array_data(obj["prompt_token_ids"], "<i8", "prompt_token_ids")
    return Group(
        group_id=_str(obj, "group_id"),
        prompt_id=_str(obj, "prompt_id"),
        prompt=_str(obj, "prompt"),
        prompt_token_ids=struct.unpack(f"<{len(prompt_ids) // 8}q", prompt_ids),
        reference=_str(obj, "reference"),
        policy_version=_int(obj, "policy_version"),
        completions=comps,
        rewards=rewards,
        reward_failures=_int(obj, "reward_failures"),
        meta=meta,
        advantages=advantages,
    )


def _decode_completions(cs: Any) -> list[Completion]:
    if type(cs) is not dict:
        raise CorruptRecordError(f"field 'completions' must be a map of columns, got {_tname(cs)}")
    if cs.keys() != _COMPLETIONS_KEYS:
        _key_mismatch(cs, _COMPLETIONS_KEYS, "completions")
    lengths, texts, finishes = cs["lengths"], cs["text"], cs["finish_reason"]
    for name, col, kind in (("lengths", lengths, int), ("text", texts, str), ("finish_reason", finishes, str)):
        if type(col) is not list:
            raise CorruptRecordError(f"field 'completions.{name}' must be a list, got {_tname(col)}")
        if len(col) != len(lengths):
            raise CorruptRecordError(
                f"field 'completions.{name}' has {len(col)} entries but 'completions.lengths' has {len(lengths)}"
            )
        if not all(type(v) is kind for v in col):
            i, v = next((i, v) for i, v in enumerate(col) if type(v) is not kind)
            raise CorruptRecordError(f"field 'completions.{name}[{i}]' must be {kind.__name__}, got {_tname(v)}")
    if lengths and min(lengths) < 0:
        raise CorruptRecordError(f"field 'completions.lengths' has a negative length {min(lengths)}")
    total = sum(lengths)
    tok = _array_data(cs["token_ids"], "<i4", "completions.token_ids")
    lp = _array_data(cs["logprobs"], "<f4", "completions.logprobs")
    for name, buf in (("token_ids", tok), ("logprobs", lp)):
        if len(buf) != 4 * total:
            raise CorruptRecordError(
                f"field 'completions.{name}' holds {len(buf) // 4} values but 'completions.lengths' sums to {total}"
            )
    tok_all, lp_all = _column(tok, "<i4"), _column(lp, "<f4")
    comps, start = [], 0
    for n, text, finish in zip(lengths, texts, finishes):
        end = start + n
        comps.append(Completion(tok_all[start:end], lp_all[start:end], text, finish))
        start = end
    return comps


def _column(data: bytes, wire: str) -> np.ndarray:
    """A writable, native-order array that owns a copy of ``data`` (never a view of the record)."""
    wire_dt, native = _WIRE_DTYPES[wire]
    a = np.frombuffer(bytearray(data), dtype=wire_dt)  # the bytearray is the copy, and writable
    return a if wire_dt is native else a.astype(native)


def _array_data(a: Any, expected: str, path: str) -> bytes:
    """Check a 1-D array map ``{dtype, shape, data}`` of the expected dtype; return its buffer."""
    try:
        if type(a) is not dict or len(a) != 3:
            raise KeyError
        dtype, shape, data = a["dtype"], a["shape"], a["data"]
    except KeyError:
        if type(a) is not dict:
            raise CorruptRecordError(
                f"field '{path}' must be an array map {{dtype, shape, data}}, got {_tname(a)}"
            ) from None
        _key_mismatch(a, _ARRAY_KEYS, path)
    if dtype != expected:
        if type(dtype) is not str or dtype not in _WIRE_DTYPES:
            raise CorruptRecordError(
                f"field '{path}' has dtype {dtype!r}, which the codec does not accept (allowed: {_ALLOWED})"
            )
        raise CorruptRecordError(f"field '{path}' has dtype {dtype!r}, expected {expected!r}")
    if type(shape) is not list or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 0:
        raise CorruptRecordError(f"field '{path}' must have a 1-D shape [n] with n >= 0, got {shape!r}")
    if type(data) is not bytes:
        raise CorruptRecordError(f"field '{path}' data must be bin, got {_tname(data)}")
    itemsize = _WIRE_DTYPES[expected][0].itemsize
    if len(data) != shape[0] * itemsize:
        raise CorruptRecordError(
            f"field '{path}' declares shape {shape} of {dtype} ({shape[0] * itemsize} bytes) "
            f"but carries {len(data)} bytes"
        )
    return data


def _str(obj: dict, key: str) -> str:
    v = obj[key]
    if type(v) is not str:
        raise CorruptRecordError(f"field '{key}' must be a str, got {_tname(v)}")
    return v


def _int(obj: dict, key: str) -> int:
    v = obj[key]
    if type(v) is not int:
        raise CorruptRecordError(f"field '{key}' must be an int, got {_tname(v)}")
    return v


def _key_mismatch(obj: dict, expected: frozenset, path: str) -> NoReturn:
    keys = set(obj)
    missing = sorted(expected - keys)
    unknown = sorted((k for k in keys if k not in expected), key=repr)
    parts = ([f"missing field(s) {', '.join(map(repr, missing))}"] if missing else []) + (
        [f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else []
    )
    raise CorruptRecordError(f"{path}: {'; '.join(parts)} (codec version {CODEC_VERSION})")
