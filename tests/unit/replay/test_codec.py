"""The replay codec: exact round trips, the record format, and an error for every way a record
or a group can be wrong. Hand-built payloads (msgpack + a valid header and CRC) test field
validation independently of the checksum."""

import dataclasses
import struct
import zlib

import crc32c
import msgpack
import numpy as np
import pytest
from helpers import codec_array, codec_frame

from rlsys.records import Completion, Group
from rlsys.replay.codec import (
    CODEC_VERSION,
    HEADER_SIZE,
    MAX_META_DEPTH,
    CodecError,
    CorruptRecordError,
    TruncatedRecordError,
    UnencodableGroupError,
    UnsupportedVersionError,
    decode_group,
    encode_group,
)


def completion(tokens, logprobs=None, text="42", finish="stop"):
    tok = np.asarray(tokens, np.int32)
    lp = np.asarray(logprobs if logprobs is not None else -np.arange(len(tok)) / 8, np.float32)
    return Completion(tok, lp, text, finish)


def sample_group(**changes):
    g = Group(
        group_id="gsm8k-17:3f2a9c1e",
        prompt_id="gsm8k-17",
        prompt="Natalia sold clips to 48 of her friends…",
        prompt_token_ids=(1, 3, 4, 150_000, 2**40),
        reference="72",
        policy_version=5,
        completions=[completion([5, 6, 7, 2], text="72 ✓"), completion([9], text="名前は 🦀", finish="length")],
        rewards=np.array([1.0, 0.0], np.float32),
        reward_failures=1,
        meta={"task": "gsm8k", "temperature": 1.0, "tags": ["a", {"b": None}], "ok": True, "big": 2**64 - 1},
    )
    return dataclasses.replace(g, **changes)


def assert_same_type_tree(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_type_tree(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_type_tree(x, y)


def assert_same_group(got: Group, want: Group):
    """Field-for-field equality, with types, dtypes and array bits (NaN payloads, -0.0)."""
    for f in ("group_id", "prompt_id", "prompt", "reference", "policy_version", "reward_failures"):
        assert getattr(got, f) == getattr(want, f) and type(getattr(got, f)) is type(getattr(want, f)), f
    assert type(got.prompt_token_ids) is tuple and all(type(t) is int for t in got.prompt_token_ids)
    assert got.prompt_token_ids == want.prompt_token_ids
    assert len(got.completions) == len(want.completions)
    for c, w in zip(got.completions, want.completions):
        assert type(c) is Completion
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
        assert c.token_ids.tobytes() == np.asarray(w.token_ids, np.int32).tobytes()
        assert c.logprobs.tobytes() == np.asarray(w.logprobs, np.float32).tobytes()
        assert (c.text, c.finish_reason) == (w.text, w.finish_reason)
    if want.rewards is None:
        assert got.rewards is None
    else:
        assert got.rewards.dtype == np.float32
        assert got.rewards.tobytes() == np.asarray(want.rewards, np.float32).tobytes()
    assert got.meta == want.meta
    assert_same_type_tree(got.meta, want.meta)


# ------------------------------------------------------------------------------ round trips


def test_round_trip_is_exact():
    g = sample_group()
    assert_same_group(decode_group(encode_group(g)), g)


@pytest.mark.parametrize(
    "changes",
    [
        {"rewards": None},
        {"meta": {}},
        {"completions": [completion([]), completion([3, 4])], "rewards": np.array([0.0, 1.0], np.float32)},
        {"completions": [], "rewards": np.zeros(0, np.float32)},
        {"completions": [], "rewards": None, "prompt_token_ids": (), "prompt": "", "reference": ""},
        {"prompt": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 – ünïcödé – 中文 – \x00nul", "group_id": "ключ:1"},
        {"rewards": np.array([np.nan, -0.0], np.float32)},
        {"policy_version": 2**63 - 1, "reward_failures": 0, "prompt_token_ids": (-(2**63), 2**63 - 1)},
    ],
    ids=[
        "no-rewards",
        "empty-meta",
        "zero-length-completion",
        "no-completions",
        "all-empty",
        "unicode",
        "nan-and-negative-zero",
        "int-extremes",
    ],
)
def test_round_trip_edge_cases(changes):
    g = sample_group(**changes)
    assert_same_group(decode_group(encode_group(g)), g)


def test_logprob_bits_survive_including_nan_payloads_and_infinities():
    bits = np.array([0x7FC00001, 0xFF800000, 0x7F800000, 0x80000000, 0x00000001], np.uint32)
    g = sample_group(completions=[completion([1, 2, 3, 4, 5], bits.view(np.float32))], rewards=None)
    got = decode_group(encode_group(g))
    assert got.completions[0].logprobs.view(np.uint32).tolist() == bits.tolist()


def test_strided_and_big_endian_input_arrays_encode_as_values():
    base = np.arange(10, dtype=np.int32)
    c = Completion(base[::2], np.arange(5, dtype=">f4") / 2, "x", "stop")
    got = decode_group(encode_group(sample_group(completions=[c], rewards=np.array([0.5], ">f4"))))
    assert got.completions[0].token_ids.tolist() == [0, 2, 4, 6, 8]
    assert got.completions[0].logprobs.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert got.completions[0].logprobs.dtype == np.dtype(np.float32)  # native order on the way out
    assert got.rewards.tolist() == [0.5]


def test_decoded_arrays_are_writable_and_private():
    g = sample_group()
    record = encode_group(g)
    got = decode_group(record)
    first, second = got.completions
    first.token_ids[:] = -1
    first.logprobs[:] = 9.0
    got.rewards[:] = 7.0
    assert second.token_ids.tolist() == [9] and second.logprobs.tolist() == [0.0]  # disjoint slices
    assert decode_group(record).completions[0].token_ids.tolist() == [5, 6, 7, 2]  # the record is untouched
    assert g.completions[0].token_ids.tolist() == [5, 6, 7, 2]


def test_random_groups_round_trip():
    rng = np.random.default_rng(1234)
    alphabet = [
        chr(c) for c in [*range(0x20, 0x7F), *range(0xA0, 0x250), *range(0x4E00, 0x4E80), *range(0x1F600, 0x1F650), 0]
    ]

    def pick(options):  # rng.choice would turn Python ints and floats into numpy scalars
        return options[int(rng.integers(0, len(options)))]

    def text(max_len):
        return "".join(rng.choice(alphabet, size=int(rng.integers(0, max_len + 1))))

    def meta_value(depth):
        kind = int(rng.integers(0, 8 if depth < 3 else 6))
        if kind == 0:
            return text(8)
        if kind == 1:
            return pick([0, -1, 2**64 - 1, -(2**63), int(rng.integers(-1000, 1000))])
        if kind == 2:
            return pick([float(rng.standard_normal()), float("inf"), float("-inf"), 0.0, -0.0, 1e300])
        if kind == 3:
            return bool(rng.integers(0, 2))
        if kind in (4, 5):
            return None
        if kind == 6:
            return [meta_value(depth + 1) for _ in range(int(rng.integers(0, 4)))]
        return {text(6): meta_value(depth + 1) for _ in range(int(rng.integers(0, 4)))}

    for _ in range(200):
        n = int(rng.integers(0, 9))
        comps = []
        for _ in range(n):
            t = int(rng.integers(0, 65))
            lp = rng.standard_normal(t).astype(np.float32)
            lp[rng.random(t) < 0.05] = np.nan
            comps.append(
                Completion(
                    rng.integers(-(2**31), 2**31, t, dtype=np.int32),
                    lp,
                    text(40),
                    str(rng.choice(["stop", "length", "abort"])),
                )
            )
        rewards = None if rng.random() < 0.3 else rng.standard_normal(n).astype(np.float32)
        g = Group(
            group_id=text(20),
            prompt_id=text(10),
            prompt=text(200),
            prompt_token_ids=tuple(int(x) for x in rng.integers(-(2**63), 2**63 - 1, int(rng.integers(0, 50)))),
            reference=text(10),
            policy_version=int(rng.integers(0, 10**9)),
            completions=comps,
            rewards=rewards,
            reward_failures=int(rng.integers(0, n + 1)),
            meta={text(6): meta_value(0) for _ in range(int(rng.integers(0, 5)))},
        )
        assert_same_group(decode_group(encode_group(g)), g)


# ---------------------------------------------------------------------------- record format


def valid_payload():
    """The version-1 payload of a two-completion group, written from the format description."""
    return {
        "group_id": "g1",
        "prompt_id": "p1",
        "prompt": "1+1=",
        "reference": "2",
        "prompt_token_ids": codec_array([1, 3, 4], "<i8"),
        "policy_version": 3,
        "reward_failures": 0,
        "completions": {
            "lengths": [2, 1],
            "token_ids": codec_array([5, 6, 7], "<i4"),
            "logprobs": codec_array([-0.5, -1.0, -2.0], "<f4"),
            "text": ["2", "3"],
            "finish_reason": ["stop", "length"],
        },
        "rewards": codec_array([1.0, 0.0], "<f4"),
        "meta": {"task": "add"},
    }


def test_header_layout_and_hand_built_payload():
    record = encode_group(sample_group())
    magic, version, length, crc = struct.unpack_from("<3sBII", record)
    assert (magic, version, HEADER_SIZE) == (b"RLG", CODEC_VERSION, 12)
    assert length == len(record) - HEADER_SIZE and crc == crc32c.crc32c(record[HEADER_SIZE:])
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    g = decode_group(codec_frame(valid_payload(), version=1))
    want = Group(
        "g1",
        "p1",
        "1+1=",
        (1, 3, 4),
        "2",
        3,
        [completion([5, 6], [-0.5, -1.0], "2", "stop"), completion([7], [-2.0], "3", "length")],
        np.array([1.0, 0.0], np.float32),
        0,
        {"task": "add"},
    )
    assert_same_group(g, want)
    assert_same_group(decode_group(encode_group(want)), g)


def test_decode_accepts_bytearray_and_memoryview_and_refuses_str():
    record = encode_group(sample_group())
    assert_same_group(decode_group(bytearray(record)), sample_group())
    assert_same_group(decode_group(memoryview(record)), sample_group())
    with pytest.raises(TypeError, match="decode_responses=True"):
        decode_group(record.decode("latin-1"))


# --------------------------------------------------------------------------- damaged records


def test_error_classes_are_value_errors():
    for cls in (CorruptRecordError, UnsupportedVersionError, TruncatedRecordError, UnencodableGroupError):
        assert issubclass(cls, CodecError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("where", [0, 1, 100, -1])
def test_flipped_payload_byte_fails_the_checksum(where):
    record = bytearray(encode_group(sample_group()))
    record[HEADER_SIZE + where if where >= 0 else where] ^= 0x40
    with pytest.raises(CorruptRecordError, match="checksum mismatch"):
        decode_group(bytes(record))


def test_flipped_crc_byte_fails_the_checksum():
    record = bytearray(encode_group(sample_group()))
    record[9] ^= 0x01
    with pytest.raises(CorruptRecordError, match="checksum mismatch"):
        decode_group(bytes(record))


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4, 7, 11, 12, 13, 200, -1])
def test_truncated_records(cut):
    record = encode_group(sample_group())
    short = record[:cut]
    with pytest.raises(TruncatedRecordError, match="cut short") as e:
        decode_group(short)
    if len(short) < HEADER_SIZE:
        assert f"record is {len(short)} bytes, shorter than the 12-byte header" in str(e.value)
    else:
        assert f"declares a {len(record) - HEADER_SIZE}-byte payload but only {len(short) - HEADER_SIZE}" in str(
            e.value
        )


def test_trailing_bytes_are_corruption():
    record = encode_group(sample_group())
    with pytest.raises(CorruptRecordError, match="3 trailing bytes"):
        decode_group(record + b"xyz")
    with pytest.raises(CorruptRecordError, match="trailing bytes"):
        decode_group(record + record)


@pytest.mark.parametrize("record", [codec_frame(valid_payload(), version=7), b"RLG\x07", b"RLG\x07" + b"\x00" * 100])
def test_newer_version_is_unsupported_even_if_the_rest_differs(record):
    with pytest.raises(UnsupportedVersionError) as e:
        decode_group(record)
    assert str(e.value) == "record has codec version 7; this rlsys reads versions <= 3 — upgrade rlsys on this node"


def test_version_zero_is_corrupt():
    with pytest.raises(CorruptRecordError, match="codec version 0, which no rlsys ever wrote"):
        decode_group(codec_frame(valid_payload(), version=0))


@pytest.mark.parametrize("record", [b"XYZ" + encode_group(sample_group())[3:], b"\x80\x04\x95", b"{", b"RLX"])
def test_bad_magic(record):
    with pytest.raises(CorruptRecordError, match="not a replay record"):
        decode_group(record)


@pytest.mark.parametrize(
    "body, msg",
    [
        (b"\xc1", "not valid msgpack"),  # 0xc1 is never used
        (msgpack.packb({"a": 1}) + b"\x01", "not valid msgpack"),  # extra data after the payload
        (msgpack.packb({1: 2}), "not valid msgpack"),  # strict_map_key: int key
        (b"\xd9\x02\xff\xfe", "not valid msgpack"),  # a str that is not UTF-8
        (b"\xc7\x04\x05abcd", "not valid msgpack"),  # an ext type
        (b"\x91" * 5000, "not valid msgpack"),  # nested beyond msgpack's stack
        (msgpack.packb([1, 2]), "payload must be a map of group fields, got list"),
    ],
)
def test_payloads_that_are_not_groups(body, msg):
    with pytest.raises(CorruptRecordError, match=msg):
        decode_group(codec_frame(body, version=1))


DELETE = object()


def with_change(path, value):
    """valid_payload() with the value at ``path`` replaced (or deleted)."""
    p = valid_payload()
    node = p
    for k in path[:-1]:
        node = node[k]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return p


@pytest.mark.parametrize(
    "path, value, msg",
    [
        (("group_id",), 17, "field 'group_id' must be a str, got int"),
        (("prompt",), b"raw", "field 'prompt' must be a str, got bytes"),
        (("policy_version",), "3", "field 'policy_version' must be an int, got str"),
        (("policy_version",), True, "field 'policy_version' must be an int, got bool"),
        (("reward_failures",), 1.0, "field 'reward_failures' must be an int, got float"),
        (("completions",), [], "field 'completions' must be a map of columns, got list"),
        (("completions", "text"), ["2", 3], r"field 'completions.text\[1\]' must be str, got int"),
        (("completions", "finish_reason"), "stop", "field 'completions.finish_reason' must be a list, got str"),
        (("completions", "lengths"), [2, 1.0], r"field 'completions.lengths\[1\]' must be int, got float"),
        (("completions", "token_ids"), [5, 6, 7], "field 'completions.token_ids' must be an array map"),
        (("prompt_token_ids",), [1, 3, 4], "field 'prompt_token_ids' must be an array map"),
        (("rewards",), "1,0", "field 'rewards' must be an array map"),
        (("rewards", "data"), "abcdefgh", "field 'rewards' data must be bin, got str"),
        (("rewards", "shape"), 2, r"field 'rewards' must have a 1-D shape \[n\] with n >= 0, got 2"),
        (("meta",), ["task"], "field 'meta' must be a map, got list"),
        (("meta", "blob"), b"\x00", r"meta\['blob'\] has type bytes"),
        (("meta", "nested"), {"k": [1, b"x"]}, r"meta\['nested'\]\['k'\]\[1\] has type bytes"),
        (("group_id",), DELETE, "payload: missing field\\(s\\) 'group_id'"),
        (("completions", "lengths"), DELETE, "completions: missing field\\(s\\) 'lengths'"),
        (("extra",), 1, "payload: unknown field\\(s\\) 'extra'"),
        (("rewards", "scale"), 1, "rewards: unknown field\\(s\\) 'scale'"),
    ],
)
def test_field_validation(path, value, msg):
    with pytest.raises(CorruptRecordError, match=msg):
        decode_group(codec_frame(with_change(path, value), version=1))


@pytest.mark.parametrize("dtype", ["<f8", "|u1", ">i4", "<i2", "|O", "<U4", 7])
def test_disallowed_dtype(dtype):
    with pytest.raises(
        CorruptRecordError,
        match=r"field 'completions.token_ids' has dtype .* which the codec "
        r"does not accept \(allowed: '<i4', '<i8', '<f4'\)",
    ):
        decode_group(codec_frame(with_change(("completions", "token_ids", "dtype"), dtype), version=1))


def test_allowed_dtype_in_the_wrong_field():
    p = with_change(("completions", "token_ids"), codec_array([5, 6, 7], "<i8"))
    with pytest.raises(CorruptRecordError, match="field 'completions.token_ids' has dtype '<i8', expected '<i4'"):
        decode_group(codec_frame(p, version=1))


@pytest.mark.parametrize(
    "path, value, msg",
    [
        (
            ("completions", "token_ids", "data"),
            np.arange(4, dtype="<i4").tobytes(),
            r"'completions.token_ids' declares shape \[3\] of <i4 \(12 bytes\) but carries 16 bytes",
        ),
        (("completions", "logprobs", "shape"), [4], r"'completions.logprobs' declares shape \[4\] of <f4 \(16 bytes\)"),
        (("completions", "logprobs", "shape"), [3, 1], r"1-D shape \[n\] with n >= 0, got \[3, 1\]"),
        (("completions", "logprobs", "shape"), [-3], r"1-D shape \[n\] with n >= 0, got \[-3\]"),
        (
            ("completions", "logprobs"),
            codec_array([-1.0, -2.0], "<f4"),
            "'completions.logprobs' holds 2 values but 'completions.lengths' sums to 3",
        ),
        (
            ("completions", "lengths"),
            [1, 1],
            "'completions.token_ids' holds 3 values but 'completions.lengths' sums to 2",
        ),
        (("completions", "lengths"), [4, -1], "negative length -1"),
        (("completions", "text"), ["2"], "'completions.text' has 1 entries but 'completions.lengths' has 2"),
        (("rewards",), codec_array([1.0], "<f4"), "field 'rewards' has 1 entries for 2 completions"),
        (("prompt_token_ids", "data"), b"\x00" * 20, r"'prompt_token_ids' declares shape \[3\] of <i8 \(24 bytes\)"),
    ],
)
def test_shape_and_length_mismatches(path, value, msg):
    with pytest.raises(CorruptRecordError, match=msg):
        decode_group(codec_frame(with_change(path, value), version=1))


# ------------------------------------------------------------------------ unencodable groups


@pytest.mark.parametrize(
    "meta, msg",
    [
        ({"pair": (1, 2)}, r"meta\['pair'\] has type tuple; .* \(use a list\)"),
        ({"n": np.int64(3)}, r"meta\['n'\] has type int64; .* \(convert numpy scalars"),
        ({"x": np.float32(0.5)}, r"meta\['x'\] has type float32"),
        ({"s": {1, 2}}, r"meta\['s'\] has type set"),
        ({"b": b"raw"}, r"meta\['b'\] has type bytes"),
        ({"deep": {"list": [object()]}}, r"meta\['deep'\]\['list'\]\[0\] has type object"),
        ({"arr": np.zeros(2)}, r"meta\['arr'\] has type ndarray"),
        ({3: "x"}, "meta has key 3 of type int; meta keys must be str"),
        ({"huge": 2**64}, r"meta\['huge'\] = 18446744073709551616 is outside the integer range"),
        ({"bad": "\ud800"}, r"meta\['bad'\] is not valid Unicode"),
    ],
)
def test_unserialisable_meta_is_refused_at_encode_naming_the_key(meta, msg):
    with pytest.raises(UnencodableGroupError, match=msg):
        encode_group(sample_group(meta=meta))


def test_too_deep_meta_is_refused():
    meta: dict = {}
    node = meta
    for _ in range(MAX_META_DEPTH + 1):
        node["k"] = {}
        node = node["k"]
    with pytest.raises(UnencodableGroupError, match=f"nested more than {MAX_META_DEPTH} levels deep"):
        encode_group(sample_group(meta=meta))


@pytest.mark.parametrize(
    "changes, msg",
    [
        (
            {"completions": [completion([1, 2]), Completion(np.zeros(2, np.int64), np.zeros(2, np.float32), "", "")]},
            r"completions\[1\].token_ids has dtype int64, but must be int32",
        ),
        (
            {"completions": [Completion(np.zeros(2, np.int32), np.zeros(2, np.float64), "", "")], "rewards": None},
            r"completions\[0\].logprobs has dtype float64, but must be float32",
        ),
        (
            {"completions": [Completion([1, 2], np.zeros(2, np.float32), "", "")], "rewards": None},
            r"completions\[0\].token_ids must be a 1-D numpy int32 array, got list",
        ),
        (
            {"completions": [Completion(np.zeros((2, 2), np.int32), np.zeros(2, np.float32), "", "")], "rewards": None},
            r"completions\[0\].token_ids must be 1-D, got shape \(2, 2\)",
        ),
        (
            {"completions": [completion([1, 2], [0.0]), completion([3])]},
            r"completions\[0\] has 2 token_ids but 1 logprobs",
        ),
        ({"completions": [completion([1], text=None)], "rewards": None}, r"completions\[0\].text must be a str"),
        ({"completions": [completion([1]), "not a completion"]}, r"completions\[1\] must be a Completion, got str"),
        ({"completions": (completion([1]),), "rewards": None}, "completions must be a list of Completion, got tuple"),
        ({"rewards": np.array([1.0], np.float32)}, "rewards has 1 entries but the group has 2 completions"),
        ({"rewards": np.array([1.0, 0.0])}, "rewards has dtype float64, but must be float32"),
        ({"prompt_token_ids": [1, 2]}, "prompt_token_ids must be a tuple of int, got list"),
        ({"prompt_token_ids": (1, 2.5)}, r"prompt_token_ids must be a tuple of int in int64 range, found 2.5"),
        ({"prompt_token_ids": (1, 2**63)}, "prompt_token_ids must be a tuple of int in int64 range, found 9223372"),
        ({"policy_version": True}, "policy_version must be an int, got bool"),
        ({"reward_failures": 1.0}, "reward_failures must be an int, got float"),
        ({"group_id": 12}, "group_id must be a str, got int"),
        ({"prompt": "bad \udc80 surrogate"}, "prompt is not valid Unicode"),
        ({"meta": [("k", 1)]}, "meta must be a dict, got list"),
    ],
)
def test_malformed_groups_are_refused_at_encode(changes, msg):
    with pytest.raises(UnencodableGroupError, match=msg):
        encode_group(sample_group(**changes))


def test_numpy_ints_in_int_fields_are_accepted_as_ints():
    g = sample_group(policy_version=np.int64(4), prompt_token_ids=(np.int32(1), 2))
    got = decode_group(encode_group(g))
    assert got.policy_version == 4 and type(got.policy_version) is int
    assert got.prompt_token_ids == (1, 2) and all(type(t) is int for t in got.prompt_token_ids)


def test_encode_refuses_what_is_not_a_group():
    with pytest.raises(UnencodableGroupError, match="needs an rlsys.records.Group, got dict"):
        encode_group({"group_id": "g"})


def test_version_2_carries_advantages_and_version_1_records_still_decode():
    g = sample_group()
    g.advantages = np.linspace(-1, 1, len(g.completions)).astype(np.float32)
    back = decode_group(encode_group(g))
    np.testing.assert_array_equal(back.advantages, g.advantages)
    assert decode_group(codec_frame(valid_payload(), version=1)).advantages is None
    v2 = dict(valid_payload(), advantages=codec_array([0.5, -0.5], "<f4"))
    np.testing.assert_array_equal(decode_group(codec_frame(v2, version=2)).advantages, [0.5, -0.5])
    with pytest.raises(CorruptRecordError, match="missing field"):
        decode_group(codec_frame(valid_payload(), version=2))  # v2 requires the key (nil allowed)
    with pytest.raises(CorruptRecordError, match="'advantages' has 1 entries for 2 completions"):
        decode_group(codec_frame(dict(valid_payload(), advantages=codec_array([0.5], "<f4")), version=2))
    g.advantages = np.zeros(len(g.completions) + 1, np.float32)
    with pytest.raises(UnencodableGroupError, match="advantages has"):
        encode_group(g)


def test_version_3_checks_crc32c_and_older_versions_zlib_crc32():
    v2 = dict(valid_payload(), advantages=None)
    assert decode_group(codec_frame(v2, version=3)).group_id == "g1"
    body = msgpack.packb(v2, use_bin_type=True)
    # The same payload under the other version's checksum is damage, named by its checksum kind.
    wrong_v3 = struct.pack("<3sBII", b"RLG", 3, len(body), zlib.crc32(body)) + body
    with pytest.raises(CorruptRecordError, match="header CRC32C"):
        decode_group(wrong_v3)
    wrong_v2 = struct.pack("<3sBII", b"RLG", 2, len(body), crc32c.crc32c(body)) + body
    with pytest.raises(CorruptRecordError, match="header CRC32 "):
        decode_group(wrong_v2)
