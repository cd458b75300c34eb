"""Redis backend of the ReplayStore contract: streams + a consumer group, durable across
learner and controller crashes (and, with AOF, Redis restarts).

Keys (``<prefix>`` = ``replay.redis.key_prefix:run_id``; two runs never share a key)::

    <prefix>:stream      XADD per scored group: gid, v (policy version), rec (codec bytes)
    <prefix>:version     learner policy version (survives a controller restart)
    <prefix>:committed   ZSET gid -> version of groups whose learner step is committed (dedupe)
    <prefix>:counters    HASH of run-wide totals: put, acked, dropped_stale, duplicates, rejected
    <prefix>:dead        XADD of rejected records (corrupt, unknown codec version) for inspection

Delivery: ``take`` reads with XREADGROUP (consumer group ``learners``), so every record is
delivered to one consumer and stays in that consumer's pending list until ``ack``, which —
in one MULTI transaction — XACKs it, records its group id as committed, and (retention
``delete_acked``) deletes it. A consumer that restarts under the same name first re-reads
its own pending entries (at-least-once); a live consumer claims entries another consumer has
left idle longer than ``claim_idle_ms`` (XAUTOCLAIM). A redelivered group whose id is already
committed, or already held by this consumer, is acknowledged and counted as a duplicate,
never trained twice.

Accounting (asserted by the crash tests): ``put = acked + dropped_stale + rejected +
duplicates_in_stream + still held``, i.e. nothing produced is lost without a counter.

Needs Redis >= 6.2 (XAUTOCLAIM, ZMSCORE). Each batch costs a fixed number of round trips, not
one per group: put = ZMSCORE + one pipeline of XADDs; take = XREADGROUP + ZMSCORE (+ one
MULTI for whatever it discards); ack = one MULTI.

Connection loss (Redis restart, failover) is retried with backoff for
``replay.redis.reconnect_timeout_s``; a retried XADD may duplicate a record, which the dedupe
rule absorbs. Records are decoded with rlsys.replay.codec (never pickle).

Security: the store refuses a server that serves unauthenticated clients (``check_auth``)
unless ``replay.redis.allow_no_auth`` (loopback hosts and unix sockets only). The password
comes from ``$RLSYS_REDIS_PASSWORD`` (``replay.redis.password_env``), never from config;
an ACL user (``replay.redis.username``) needs only ``~<key_prefix>:*`` and the commands in
deploy/redis/redis.conf; ``rediss://`` (or ``replay.redis.tls``) verifies the server's
certificate against ``replay.redis.tls_ca_cert`` or the system CAs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl as _ssl
import time
from collections import deque
from typing import Any, Awaitable, Callable, Optional

import redis.asyncio as aioredis
from redis import exceptions as rexc

from rlsys.records import Group
from rlsys.replay.base import AdmissionGate, ReplayConfig, ReplayCounters, StoreClosed, must_drop
from rlsys.replay.codec import CodecError, decode_group, encode_group

log = logging.getLogger(__name__)

GROUP = b"learners"
TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError)


class ReplayUnavailable(RuntimeError):
    """Redis could not be reached (or refused us) for longer than the reconnect timeout."""


class ReplayConfigError(RuntimeError):
    """Redis is reachable but cannot be used as configured (auth, key type)."""


def connect(cfg: ReplayConfig, credentials: bool = True) -> aioredis.Redis:
    """A client for ``replay.redis``: TLS as configured, the password from ``$password_env``
    (with ``credentials=False``, none: the probe of ``check_auth``)."""
    rc = cfg.redis
    # 1 MiB reads: records are tens of KB and XREADGROUP replies MBs; 64 KiB reads halve throughput.
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "socket_read_size": 1 << 20,
        "socket_timeout": max(10.0, rc.block_ms / 1000 * 4),
        "health_check_interval": 15,
    }
    password = os.environ.get(rc.password_env) or None
    if password is not None and credentials:
        kwargs["password"] = password
    if rc.username and credentials:
        kwargs["username"] = rc.username
    if rc.tls or rc.url.startswith("rediss://"):
        url = rc.url.replace("redis://", "rediss://", 1)
        kwargs["ssl_cert_reqs"] = _ssl.CERT_REQUIRED
        kwargs["ssl_check_hostname"] = True  # redis-py < 6 defaults to False
        if rc.tls_ca_cert:
            kwargs["ssl_ca_certs"] = rc.tls_ca_cert
    else:
        url = rc.url
    return aioredis.Redis.from_url(url, **kwargs)


def _tls_refused(error: BaseException) -> bool:
    return "certificate verify failed" in str(error).lower()


def _tls_error(url: str, error: BaseException) -> ReplayConfigError:
    return ReplayConfigError(
        f"TLS to Redis at {url} failed: {error}; set replay.redis.tls_ca_cert to the CA that signed the server's "
        "certificate, and use a host name the certificate names"
    )


async def check_auth(cfg: ReplayConfig) -> None:
    """Refuse a Redis server that serves clients without authentication (unless
    ``replay.redis.allow_no_auth``, which config validation limits to loopback hosts and unix
    sockets), and a protected one when no password is configured.

    Probe: a second connection, with no credentials at all, sends PING. A server with
    ``requirepass``, or with ``user default off`` and ACL users, answers NOAUTH (or NOPERM
    when the default user may not even PING); an open one answers PONG. The probe is made
    whether or not the run has credentials: a server whose default user is open is exposed
    to anyone who can reach it, whatever user rlsys itself logs in as.
    """
    rc = cfg.redis
    probe = connect(cfg, credentials=False)
    try:
        await probe.ping()
        open_server = True
    except (rexc.AuthenticationError, rexc.NoPermissionError):
        open_server = False
    except rexc.ResponseError as e:
        if "NOAUTH" not in str(e):
            raise
        open_server = False
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:  # after AuthenticationError, a subclass
        if _tls_refused(e):  # the server answers, its certificate does not verify
            raise _tls_error(rc.url, e) from e
        raise ReplayUnavailable(
            f"nothing answers at replay.redis.url={rc.url} ({type(e).__name__}: {e}). Start a Redis server "
            f"there with a password (e.g. 'redis-server --port <port> --requirepass <password>', or with "
            f"deploy/redis/redis.conf; the password goes in ${rc.password_env}), or point replay.redis.url at a "
            f"running one; replay=inprocess needs no server"
        ) from None
    finally:
        await probe.aclose()
    has_password = bool(os.environ.get(rc.password_env))
    if open_server and not rc.allow_no_auth:
        raise ReplayConfigError(
            f"Redis at {rc.url} accepts clients without authentication; refusing to use it for the replay "
            f"store (anyone who can reach it could read or forge training data). Require a password "
            f"(requirepass, or an ACL user and 'user default off' as in deploy/redis/redis.conf) and put it "
            f"in ${rc.password_env} (with replay.redis.username for an ACL user), or, for a throwaway "
            f"development server on localhost, set replay.redis.allow_no_auth=true"
        )
    if open_server:
        log.warning("Redis at %s accepts clients without authentication (replay.redis.allow_no_auth=true)", rc.url)
    elif not has_password:
        user_hint = "" if rc.username else " (and, for an ACL user, its name in replay.redis.username)"
        raise ReplayConfigError(
            f"Redis at {rc.url} requires authentication and ${rc.password_env} is not set: "
            f"put the password in ${rc.password_env}{user_hint}"
        )


class RedisReplayStore:
    """ReplayStore on Redis streams. One instance per consumer (the controller by default)."""

    def __init__(
        self,
        cfg: ReplayConfig,
        groups_per_step: int,
        run_id: str,
        consumer: str = "controller",
        claim_idle_ms: int = 60_000,
    ):
        self.cfg = cfg
        self.rc = cfg.redis
        run = self.rc.run_id or run_id
        self.prefix = f"{self.rc.key_prefix}:{run}"
        self.k_stream = f"{self.prefix}:stream".encode()
        self.k_version = f"{self.prefix}:version".encode()
        self.k_committed = f"{self.prefix}:committed".encode()
        self.k_counters = f"{self.prefix}:counters".encode()
        self.k_dead = f"{self.prefix}:dead".encode()
        self.consumer = consumer.encode()
        self.claim_idle_ms = claim_idle_ms
        self.counters = ReplayCounters()
        self.gate = AdmissionGate(cfg.max_staleness, groups_per_step)
        self._r: Optional[aioredis.Redis] = None
        self._buffer: deque[tuple[bytes, dict]] = deque()  # redelivered / claimed entries, served first
        self._pending: dict[str, tuple[bytes, Group]] = {}  # gid -> (stream id, group), taken not acked

    # -- plumbing ------------------------------------------------------------------------
    @property
    def learner_version(self) -> int:
        return self.gate.learner_version

    @property
    def capacity(self) -> int:
        return self.gate.capacity

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis operation, retrying transient connection failures with backoff."""
        deadline = time.monotonic() + self.rc.reconnect_timeout_s
        delay, warned = 0.05, False
        while True:
            if self._r is None:
                raise StoreClosed(f"replay store closed (during {what})")
            try:
                return await fn()
            except rexc.AuthenticationError as e:
                if "without any password configured" in str(e) or "no password is set" in str(e):  # open server
                    raise ReplayConfigError(
                        f"Redis at {self.rc.url} has no password configured, but "
                        f"${self.rc.password_env} is set: configure requirepass (or an ACL "
                        f"user) on the server, or unset ${self.rc.password_env}"
                    ) from e
                raise ReplayConfigError(
                    f"Redis at {self.rc.url} refused authentication"
                    f"{' for user ' + repr(self.rc.username) if self.rc.username else ''}: {e}; "
                    f"set the password in ${self.rc.password_env}"
                ) from e
            except rexc.NoPermissionError as e:  # NOPERM (redis-py strips the code from the message)
                user = repr(self.rc.username) if self.rc.username else "default"
                raise ReplayConfigError(
                    f"Redis at {self.rc.url} denied {what} under {self.prefix!r} to user {user}: "
                    f"{e}; the ACL user needs ~{self.rc.key_prefix}:* and the commands of the "
                    f"'user rlsys' line in deploy/redis/redis.conf"
                ) from e
            except rexc.ResponseError as e:
                if "WRONGTYPE" in str(e):
                    raise ReplayConfigError(
                        f"a Redis key under {self.prefix!r} holds the wrong type ({e}); another "
                        "program uses this prefix: set replay.redis.key_prefix or run_id"
                    ) from e
                if "NOGROUP" in str(e):
                    log.error(
                        "consumer group missing on %s (Redis restarted without persistence?); recreating it",
                        self.k_stream.decode(),
                    )
                    await self._ensure_group()
                    continue
                raise
            except TRANSIENT as e:
                if _tls_refused(e):  # TLS: retrying will not help
                    raise _tls_error(self.rc.url, e) from e
                if self.gate.closed:
                    raise StoreClosed("replay store closed") from e
                if time.monotonic() > deadline:
                    raise ReplayUnavailable(
                        f"Redis at {self.rc.url} unreachable for {self.rc.reconnect_timeout_s}s during {what}: {e}"
                    ) from e
                if not warned:
                    log.warning("Redis connection lost during %s (%s); reconnecting", what, e)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _ensure_group(self) -> None:
        try:
            await self._r.xgroup_create(self.k_stream, GROUP, id=b"0", mkstream=True)
        except rexc.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (after ``check_auth``), create the consumer group, recover this consumer's
        unacknowledged groups. Raises ReplayConfigError for an unauthenticated server."""
        self._r = connect(self.cfg)
        await self._call("auth check", lambda: check_auth(self.cfg))
        await self._call("ping", self._r.ping)
        await self._call("create group", self._ensure_group)
        version = await self._call("get version", lambda: self._r.get(self.k_version))
        if version is None:
            await self._call("set version", lambda: self._r.set(self.k_version, 0))
            version = 0
        self.gate.learner_version = int(version)
        totals = await self.totals()
        groups = await self._call("xinfo", lambda: self._r.xinfo_groups(self.k_stream))
        info = next(g for g in groups if g["name"] == GROUP)
        in_store = int(info.get("lag") or 0) + int(info["pending"])
        # admitted = everything committed, dropped-and-regenerable excluded, plus what the store holds
        self.gate.admitted = totals.get("acked", 0) + in_store
        recovered = await self._read(b"0", count=100_000, block=None)
        self._buffer.extend(recovered)
        if recovered:
            self.counters.requeued += len(recovered)
            log.warning(
                "recovered %d unacknowledged group(s) pending for consumer %s", len(recovered), self.consumer.decode()
            )
        log.info(
            "replay store on Redis: prefix %s, learner version %d, %d stored",
            self.prefix,
            self.gate.learner_version,
            in_store,
        )

    async def stop(self) -> None:
        await self.gate.close()

    async def close(self) -> None:
        await self.stop()
        if self._r is not None:
            if self.rc.key_ttl_s:
                keys = (self.k_stream, self.k_version, self.k_committed, self.k_counters, self.k_dead)
                try:
                    async with self._r.pipeline(transaction=False) as p:
                        for k in keys:
                            p.expire(k, self.rc.key_ttl_s)
                        await p.execute()
                except TRANSIENT:
                    log.warning("could not set the expiry of %s:* while closing", self.prefix)
            await self._r.aclose()
            self._r = None

    # -- producers -----------------------------------------------------------------------
    async def reserve(self, k: int) -> int:
        return await self.gate.reserve(k)

    async def release(self, k: int) -> None:
        await self.gate.release(k)

    async def put(self, groups: list[Group]) -> None:
        if not groups:
            return
        records = [(g.group_id, g.policy_version, encode_group(g)) for g in groups]

        async def op():
            committed = await self._r.zmscore(self.k_committed, [gid for gid, _, _ in records])
            async with self._r.pipeline(transaction=False) as p:
                fresh = [r for r, c in zip(records, committed) if c is None]
                for gid, v, rec in fresh:
                    p.xadd(self.k_stream, {b"gid": gid.encode(), b"v": str(v).encode(), b"rec": rec})
                p.hincrby(self.k_counters, "put", len(fresh))
                if len(fresh) < len(records):
                    p.hincrby(self.k_counters, "duplicates", len(records) - len(fresh))
                await p.execute()
            return len(fresh)

        fresh = await self._call("put", op)
        self.counters.put += fresh
        self.counters.duplicates += len(records) - fresh

    # -- consumers -----------------------------------------------------------------------
    async def _read(self, start: bytes, count: int, block: Optional[int]) -> list[tuple[bytes, dict]]:
        resp = await self._call(
            "read", lambda: self._r.xreadgroup(GROUP, self.consumer, {self.k_stream: start}, count=count, block=block)
        )
        if not resp:
            return []
        _, entries = resp[0]
        return [(eid, fields) for eid, fields in entries if fields]  # deleted entries come back empty

    async def _claim(self) -> None:
        if self.claim_idle_ms <= 0:
            return
        resp = await self._call(
            "claim",
            lambda: self._r.xautoclaim(
                self.k_stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id=b"0-0", count=1000
            ),
        )
        claimed = [(eid, f) for eid, f in resp[1] if f]
        mine = {eid for eid, _ in self._pending.values()}
        fresh = [(eid, f) for eid, f in claimed if eid not in mine]
        if fresh:
            log.warning("claimed %d group(s) left idle by another consumer", len(fresh))
            self._buffer.extend(fresh)
            self.counters.requeued += len(fresh)

    async def _vet(self, entries: list[tuple[bytes, dict]]) -> list[tuple[bytes, Group]]:
        """Decode and vet delivered entries in one round trip: corrupt records go to the
        dead-letter stream, duplicates and stale groups are acknowledged away; all counted."""
        decoded, rejected = [], []
        for eid, fields in entries:
            try:
                decoded.append((eid, decode_group(fields[b"rec"])))
            except (CodecError, KeyError) as e:
                rejected.append((eid, fields, e))
        committed = []
        if decoded:
            committed = await self._call(
                "dedupe", lambda: self._r.zmscore(self.k_committed, [g.group_id for _, g in decoded])
            )
        keep, discard = [], {"duplicates": [], "dropped_stale": [], "rejected": [eid for eid, _, _ in rejected]}
        batch_ids: set[str] = set()
        for (eid, g), c in zip(decoded, committed):
            held = self._pending.get(g.group_id)
            if c is not None or (held is not None and held[0] != eid) or g.group_id in batch_ids:
                discard["duplicates"].append(eid)
            elif must_drop(g.policy_version, self.learner_version, self.cfg):
                log.warning(
                    "dropped stale group %s (version %d, learner %d, max_staleness %d)",
                    g.group_id,
                    g.policy_version,
                    self.learner_version,
                    self.cfg.max_staleness,
                )
                discard["dropped_stale"].append(eid)
            else:
                keep.append((eid, g))
                batch_ids.add(g.group_id)
        for eid, _, e in rejected:
            log.error("rejected replay record %s: %s (moved to %s)", eid.decode(), e, self.k_dead.decode())
        if any(discard.values()):

            async def op():
                async with self._r.pipeline(transaction=True) as p:
                    for eid, fields, e in rejected:
                        p.xadd(
                            self.k_dead,
                            {
                                **{k: v for k, v in fields.items() if isinstance(k, bytes)},
                                b"error": str(e).encode(),
                                b"id": eid,
                            },
                            maxlen=10_000,
                            approximate=True,
                        )
                    ids = [eid for eids in discard.values() for eid in eids]
                    p.xack(self.k_stream, GROUP, *ids)
                    p.xdel(self.k_stream, *ids)
                    for counter, eids in discard.items():
                        if eids:
                            p.hincrby(self.k_counters, counter, len(eids))
                    await p.execute()

            await self._call("discard", op)
        self.counters.rejected += len(discard["rejected"])
        self.counters.duplicates += len(discard["duplicates"])
        self.counters.dropped_stale += len(discard["dropped_stale"])
        freed = len(discard["rejected"]) + len(discard["dropped_stale"])
        if freed:
            await self.gate.release(freed)  # those slots may be generated again
        return keep

    async def take(self, k: int) -> list[Group]:
        out: list[Group] = []
        claimed_once = False
        while len(out) < k:
            if self.gate.closed:
                raise StoreClosed("replay store closed")
            if self._buffer:
                entries = [self._buffer.popleft() for _ in range(min(k - len(out), len(self._buffer)))]
            else:
                entries = await self._read(b">", count=k - len(out), block=self.rc.block_ms)
                if not entries and not claimed_once:
                    await self._claim()
                    claimed_once = True
            for eid, g in await self._vet(entries):
                self._pending[g.group_id] = (eid, g)
                out.append(g)
        self.counters.count_taken(out, self.learner_version, self.cfg.max_staleness)
        return out

    async def ack(self, group_ids: list[str]) -> None:
        held = [(gid, self._pending[gid][0]) for gid in group_ids if gid in self._pending]
        if not held:
            return
        version = self.learner_version

        async def op():
            async with self._r.pipeline(transaction=True) as p:
                p.xack(self.k_stream, GROUP, *[eid for _, eid in held])
                p.zadd(self.k_committed, {gid: version for gid, _ in held})
                if self.rc.delete_acked:
                    p.xdel(self.k_stream, *[eid for _, eid in held])
                p.hincrby(self.k_counters, "acked", len(held))
                p.zremrangebyscore(self.k_committed, "-inf", version - self.rc.dedupe_window_versions)
                await p.execute()

        await self._call("ack", op)
        for gid, _ in held:
            del self._pending[gid]
        self.counters.acked += len(held)

    async def requeue_pending(self) -> int:
        n = len(self._pending)
        for eid, g in sorted(self._pending.values(), key=lambda x: x[0], reverse=True):
            self._buffer.appendleft((eid, {b"rec": encode_group(g)}))
        self._pending.clear()
        self.counters.requeued += n
        return n

    async def set_learner_version(self, version: int) -> None:
        await self._call("set version", lambda: self._r.set(self.k_version, version))
        await self.gate.advance(version)

    async def resume(self, version: int, trained_groups: int) -> None:
        # The stream still holds the run's untrained groups; what the crashed run trained after the
        # checkpoint is gone and will be generated again. Admission = trained + held. Held groups
        # from versions past the checkpoint are from a rolled-back policy: take drops them (counted).
        groups = await self._call("xinfo", lambda: self._r.xinfo_groups(self.k_stream))
        info = next(g for g in groups if g["name"] == GROUP)
        self.gate.admitted = trained_groups + int(info.get("lag") or 0) + int(info["pending"])
        await self.set_learner_version(version)

    async def depth(self) -> int:
        """Records stored and not yet delivered, plus those read ahead into this consumer's buffer.

        With ``delete_acked`` the stream holds exactly the unacknowledged records, so this is
        XLEN minus the group's pending count (two reads, not atomic: a gauge, clamped at 0). The
        group's ``lag`` is the fallback when acknowledged records stay in the stream: after Redis
        restarts it read 12,800 records too many in the 30-minute soak (scripts/soak.py)."""
        groups = await self._call("xinfo", lambda: self._r.xinfo_groups(self.k_stream))
        info = next(g for g in groups if g["name"] == GROUP)
        if self.rc.delete_acked:
            stored = await self._call("xlen", lambda: self._r.xlen(self.k_stream)) - int(info["pending"])
        else:
            stored = int(info.get("lag") or 0)
        return max(stored, 0) + len(self._buffer)

    async def totals(self) -> dict[str, int]:
        """Run-wide counters (all consumers, all incarnations)."""
        raw = await self._call("totals", lambda: self._r.hgetall(self.k_counters))
        return {k.decode(): int(v) for k, v in raw.items()}
