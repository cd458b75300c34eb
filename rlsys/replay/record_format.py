"""The replay record format, version by version: the layout, the limits, the checksum, and the
errors a reader raises (rlsys/replay/codec.py writes and reads it).

The replay codec: scored groups to bytes and back, safely, for stores across a network.

A replay store (Redis) is a network boundary, so records are never pickled: a record can
only ever decode to a ``Group`` of plain Python values and numpy arrays, or raise a
``CodecError`` that says what was wrong with it. Pure functions, no I/O.

Record layout (integers little-endian)::

    offset  size  field
    0       3     magic b"RLG"
    3       1     codec version (this build writes CODEC_VERSION and reads 1..CODEC_VERSION)
    4       4     payload length in bytes (uint32)
    8       4     checksum of the payload (uint32): CRC32C (Castagnoli) from version 3 on,
                  zlib's CRC32 in versions 1 and 2
    12      n     payload: one msgpack map (version 1 below)

Version 1 payload, a map with exactly these keys::

    group_id, prompt_id, prompt, reference: str
    prompt_token_ids: array <i8 [P]
    policy_version, reward_failures:       int
    completions: {lengths:       [T_0, ..., T_{n-1}]     (int >= 0)
                  token_ids:     array <i4 [sum T]        all completions, concatenated
                  logprobs:      array <f4 [sum T]
                  text:          [str] * n
                  finish_reason: [str] * n}
    rewards: array <f4 [n] | nil
    advantages: array <f4 [n] | nil     (versions 2 and 3; absent from version 1 records)
    meta:    map of str -> str/int/float/bool/nil/list/map (str keys all the way down)

An *array* is the map ``{dtype: "<i4"|"<i8"|"<f4", shape: [d], data: bin}`` holding the raw
little-endian buffer, ``len(data) == d * itemsize``; every array in version 1 is 1-D, and
dtypes outside that allow-list are refused. Completions are stored by column (one buffer
of all token ids, one of all logprobs, split by ``lengths``) rather than one map per
completion: msgpack's cost is per object, and this keeps a 16-completion group at ~40
objects instead of ~300 and cuts encode+decode time by about a third. ``len(token_ids) ==
len(logprobs)`` per completion holds by construction: both columns are split by the same
``lengths``, and each column's size must equal ``sum(lengths)``.

Rules:

* **Exact round trip.** ``decode_group(encode_group(g))`` equals ``g`` field for field and
  bit for bit in the arrays (NaN payloads, -0.0), with the dtypes of ``records.py``. The
  encoder never casts: an int64 ``token_ids`` is refused, not narrowed.
* **The writer refuses what the reader would refuse.** ``encode_group`` checks the types,
  dtypes, lengths and limits that ``decode_group`` checks, and raises
  ``UnencodableGroupError`` naming the field, so a record that was written always reads.
* **Decoded arrays are writable and private to the decoded group.** The payload is copied
  once per column into a fresh buffer; each completion's ``token_ids`` / ``logprobs`` is a
  disjoint slice of its column (``rewards`` has its own). Nothing points into the record's
  bytes, so downstream code may write into the arrays, and they are in native byte order.
  Holding one completion's array keeps its group's column alive (32 KiB for 16 x 512 tokens).
* **Versioning.** Any change to the payload, even a new optional field, bumps
  ``CODEC_VERSION``. A reader decodes every version up to its own and refuses newer ones
  with ``UnsupportedVersionError`` (upgrade that node). Unknown keys in a known version are
  corruption.
* **Limits.** msgpack is decoded with ``strict_map_key``, no ext types and bounded lengths
  (``MAX_BIN_LEN`` etc.), so a damaged or hostile record cannot allocate without bound or
  produce anything but the types above.
"""

from __future__ import annotations

import struct
import zlib

import crc32c

CODEC_VERSION = 3
"""The version this build writes, and the highest it reads. Version 3 changed only the
checksum: CRC32C, which SSE4.2/ARMv8 compute in hardware (~8x faster than zlib's CRC32 on
a 66 KB record, measured), because the checksum was a third of encode + decode time."""

MAGIC = b"RLG"
HEADER = struct.Struct("<3sBII")  # magic, version, payload length, payload checksum
HEADER_SIZE = HEADER.size  # 12

MAX_BIN_LEN = 64 * 1024 * 1024
"""Largest array buffer in bytes: 16M tokens in one group's token_ids column."""
MAX_STR_LEN = 16 * 1024 * 1024
"""Longest string, in UTF-8 bytes."""
MAX_ARRAY_LEN = 1 << 20
"""Longest msgpack list: completions per group, items of a list in ``meta``."""
MAX_MAP_LEN = 1 << 16
"""Most keys in one map (only ``meta`` maps can have many)."""
MAX_META_DEPTH = 32
"""Deepest nesting of lists/maps inside ``meta``."""
MAX_PAYLOAD = 0xFFFFFFFF  # the header's uint32 length field


class CodecError(ValueError):
    """A group could not be encoded, or a record could not be decoded."""


class CorruptRecordError(CodecError):
    """The record is damaged or was not written by this codec: magic, CRC, structure or a field is wrong."""


class UnsupportedVersionError(CodecError):
    """The record was written by a newer rlsys, with a codec version this build cannot read."""


class TruncatedRecordError(CodecError):
    """The record is shorter than its header says: a partial write or a short read."""


class UnencodableGroupError(CodecError):
    """The group cannot be written: a field has the wrong type or dtype, or exceeds a limit."""


def checksum(payload: bytes | memoryview, version: int) -> int:
    """The header checksum of ``payload`` as codec ``version`` defines it."""
    return crc32c.crc32c(payload) if version >= 3 else zlib.crc32(payload)
