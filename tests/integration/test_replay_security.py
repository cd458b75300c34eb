"""The Redis replay store's locks, against real redis-servers started on free loopback ports
(tests/helpers.RedisServer; never any other Redis): refusal of a server that serves
unauthenticated clients, allow_no_auth for a loopback dev server, the ACL user of
deploy/redis/redis.conf confined to its key prefix, and TLS.

Covered elsewhere, not repeated here: a wrong password is a clear error that does not echo it
(test_replay_contract.py::test_auth_refusal_is_a_clear_error); two runs on one Redis never
see each other's groups (test_replay_contract.py::test_two_runs_on_one_redis_never_see_each_other);
allow_no_auth for a remote host is a config error (tests/unit/test_security.py).
"""

import asyncio
import logging
import secrets
import uuid
from pathlib import Path

import pytest
from helpers import RedisServer, make_group, make_tls_files

from rlsys.replay import make_store
from rlsys.replay.base import RedisConfig, ReplayConfig
from rlsys.replay.redis_store import ReplayConfigError

pytestmark = pytest.mark.integration

REDIS_CONF = Path(__file__).parents[2] / "deploy" / "redis" / "redis.conf"


def run(coro):
    return asyncio.run(coro)


def _store(url, run_id=None, consumer="controller", **kw):
    cfg = ReplayConfig(backend="redis", redis=RedisConfig(url=url, block_ms=20, **kw))
    return make_store(cfg, 2, run_id=run_id or uuid.uuid4().hex[:8], consumer=consumer)


async def _round_trip(store):
    """put / take / ack of two groups through a started store; returns the acked ids."""
    await store.reserve(2)
    gs = [make_group(0), make_group(0)]
    await store.put(gs)
    got = await store.take(2)
    await store.ack([g.group_id for g in got])
    assert sorted(g.group_id for g in got) == sorted(g.group_id for g in gs)
    return [g.group_id for g in got]


@pytest.fixture
def open_server(tmp_path):
    """A redis-server that lets anyone in (no requirepass)."""
    server = RedisServer(tmp_path / "open", appendonly=False, password=None)
    Path(server.dir).mkdir()
    yield server.start()
    server.stop()


@pytest.mark.parametrize("rlsys_has_password", [False, True])
def test_a_server_open_to_unauthenticated_clients_is_refused(open_server, monkeypatch, rlsys_has_password):
    """Refused whether or not rlsys has a password of its own: anyone else still gets in."""
    if rlsys_has_password:
        monkeypatch.setenv("RLSYS_REDIS_PASSWORD", "some-password")
    else:
        monkeypatch.delenv("RLSYS_REDIS_PASSWORD", raising=False)
    with pytest.raises(ReplayConfigError) as e:
        run(_store(open_server.url).start())
    msg = str(e.value)
    assert "accepts clients without authentication" in msg and open_server.url in msg
    for fix in ("requirepass", "$RLSYS_REDIS_PASSWORD", "replay.redis.allow_no_auth=true"):
        assert fix in msg, (fix, msg)
    assert open_server.client().dbsize() == 0  # refused before writing anything


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_allow_no_auth_runs_the_store_on_a_loopback_server(open_server, monkeypatch, caplog, host):
    monkeypatch.delenv("RLSYS_REDIS_PASSWORD", raising=False)
    store = _store(f"redis://{host}:{open_server.port}/0", allow_no_auth=True)

    async def scenario():
        await store.start()
        acked = await _round_trip(store)
        await store.close()
        return acked

    with caplog.at_level(logging.WARNING, logger="rlsys.replay.redis_store"):
        assert len(run(scenario())) == 2
    assert "accepts clients without authentication (replay.redis.allow_no_auth=true)" in caplog.text


def test_a_protected_server_without_a_password_configured_is_a_clear_error(redis_server, monkeypatch):
    monkeypatch.delenv("RLSYS_REDIS_PASSWORD", raising=False)
    with pytest.raises(ReplayConfigError, match=r"requires authentication and \$RLSYS_REDIS_PASSWORD is not set"):
        run(_store(redis_server.url).start())


def _acl_lines(password):
    """The ACL lines of deploy/redis/redis.conf (default user off, user rlsys), with ``password``."""
    lines = [ln.strip() for ln in REDIS_CONF.read_text().splitlines() if ln.startswith("user ")]
    assert lines == [lines[0], lines[1]] and lines[0] == "user default off" and ">CHANGE_ME" in lines[1]
    return [lines[0], lines[1].replace(">CHANGE_ME", f">{password}")]


@pytest.fixture
def acl_server(tmp_path, monkeypatch):
    """A redis-server configured with redis.conf's ACL lines (plus a test admin user, to look
    at what rlsys wrote); rlsys logs in as user rlsys. Yields (server, rlsys password, admin client)."""
    import redis

    password, admin_pw = f"acl-{secrets.token_hex(12)}", secrets.token_hex(12)
    server = RedisServer(
        tmp_path / "acl",
        appendonly=False,
        password=None,
        acl=[*_acl_lines(password), f"user testadmin on >{admin_pw} ~* &* +@all"],
    )
    Path(server.dir).mkdir()
    server.start()
    monkeypatch.setenv("RLSYS_REDIS_PASSWORD", password)
    yield server, password, redis.Redis.from_url(server.url, username="testadmin", password=admin_pw)
    server.stop()


def test_the_documented_acl_user_runs_every_store_operation_and_nothing_else(acl_server):
    """The ``user rlsys`` line of deploy/redis/redis.conf is enough for the whole store
    (start, put, take, dedupe, dead letters, requeue, claim, resume, totals, close with
    expiry), confined to ~rlsys:* and without server-wide commands."""
    import redis

    server, password, admin = acl_server
    run_id = uuid.uuid4().hex[:8]
    as_rlsys = redis.Redis.from_url(server.url, username="rlsys", password=password)

    async def scenario():
        a = _store(server.url, run_id=run_id, username="rlsys")
        await a.start()
        await _round_trip(a)
        await a.set_learner_version(1)  # a step committed: room for the next one
        await a.reserve(2)
        g, h = make_group(1), make_group(1)
        as_rlsys.xadd(f"rlsys:{run_id}:stream", {"gid": "bad", "v": "0", "rec": b"not a record"})
        await a.put([g, g])  # a retried producer call: one duplicate
        await a.put([h])
        first = await a.take(2)  # the bad record goes to the dead-letter stream
        assert await a.requeue_pending() == 2  # a failed learner step
        again = await a.take(2)
        assert sorted(x.group_id for x in again) == sorted(x.group_id for x in first)
        await a.ack([x.group_id for x in again])
        await a.set_learner_version(2)
        await a.reserve(1)
        await a.put([make_group(2)])
        b = _store(server.url, run_id=run_id, username="rlsys", consumer="learner-1")
        b.claim_idle_ms = 1
        await b.start()
        held = await a.take(1)  # consumer a "dies" holding it; b claims it
        await asyncio.sleep(0.01)
        claimed = await b.take(1)
        assert [x.group_id for x in claimed] == [x.group_id for x in held]
        await b.ack([x.group_id for x in claimed])
        await b.resume(3, trained_groups=5)
        depth, totals = await b.depth(), await b.totals()
        await a.close()
        await b.close()
        return depth, totals, a

    depth, totals, a = run(asyncio.wait_for(scenario(), 60))
    assert depth == 0 and totals["acked"] == 5 and totals["rejected"] == 1 and totals["duplicates"] == 1
    assert a.counters.rejected == 1
    assert 0 < admin.ttl(f"rlsys:{run_id}:committed") <= RedisConfig().key_ttl_s  # close set the expiry
    assert admin.xlen(f"rlsys:{run_id}:dead") == 1
    # confined: other keys and server-wide commands are refused
    for forbidden in (
        lambda: as_rlsys.get("otherapp:key"),
        as_rlsys.flushall,
        lambda: as_rlsys.keys("*"),
        lambda: as_rlsys.config_get("requirepass"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()


def test_the_acl_user_is_refused_under_another_key_prefix(acl_server):
    server, _, admin = acl_server
    with pytest.raises(
        ReplayConfigError, match="(?s)denied create group under 'otherapp:.*user 'rlsys'.*permissions.*~otherapp:\\*"
    ):
        run(_store(server.url, username="rlsys", key_prefix="otherapp").start())
    assert admin.keys("otherapp:*") == []


def test_the_acl_user_with_a_wrong_password_is_a_clear_error(acl_server, monkeypatch):
    server, password, _ = acl_server
    monkeypatch.setenv("RLSYS_REDIS_PASSWORD", "not-" + password)
    with pytest.raises(ReplayConfigError, match="refused authentication for user 'rlsys'") as e:
        run(_store(server.url, username="rlsys").start())
    assert password not in str(e.value)


@pytest.fixture
def tls_server(tmp_path, request):
    """A TLS-only redis-server with a certificate from a test CA, for ``localhost`` unless the
    test is parametrized indirectly with other names. Yields (server, CA file)."""
    names = getattr(request, "param", ("localhost",))
    files = make_tls_files(tmp_path / "tls", dns_names=names, ip=None if names != ("localhost",) else "127.0.0.1")
    if files is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available to make a test CA")
    server = RedisServer(tmp_path / "tls-redis", appendonly=False, tls=files)
    Path(server.dir).mkdir()
    try:
        server.start()
    except Exception as e:  # noqa: BLE001  (classified below: only a build without TLS is a skip)
        log = Path(server.dir, "redis.log")
        text = log.read_text() if log.exists() else ""
        if "TLS" in text and ("not supported" in text.lower() or "not built" in text.lower()):
            pytest.skip(f"redis-server was built without TLS support: {text.strip().splitlines()[-1]}")
        raise RuntimeError(f"TLS redis-server did not start ({e}); log: {text[-2000:]}") from e
    yield server, files[2]
    server.stop()


@pytest.mark.parametrize("how", ["rediss_url", "tls_flag"])
def test_tls_round_trip(tls_server, how):
    """put / take / ack over TLS, the server's certificate verified against the test CA;
    ``replay.redis.tls=true`` turns a redis:// URL into rediss://."""
    server, ca = tls_server
    url = server.url if how == "rediss_url" else server.url.replace("rediss://", "redis://")
    store = _store(url, tls=how == "tls_flag", tls_ca_cert=str(ca))

    async def scenario():
        await store.start()
        acked = await _round_trip(store)
        totals = await store.totals()
        await store.close()
        return acked, totals

    acked, totals = run(scenario())
    assert len(acked) == 2 and totals["acked"] == 2
    assert server.client().exists(f"{store.prefix}:committed") == 1  # it really went to this server


def test_tls_refuses_a_server_certificate_it_cannot_verify(tls_server):
    """Without the test CA the certificate does not verify (the system CAs do not know it):
    a config error at once, not a reconnect loop."""
    server, _ = tls_server
    with pytest.raises(ReplayConfigError, match="(?s)certificate verify failed.*replay.redis.tls_ca_cert"):
        run(asyncio.wait_for(_store(server.url).start(), 10))


@pytest.mark.parametrize("tls_server", [("redis.other.invalid",)], indirect=True)
def test_tls_refuses_a_certificate_for_another_host_name(tls_server):
    """The CA is trusted, but the certificate names another host: the host name is checked."""
    server, ca = tls_server
    with pytest.raises(ReplayConfigError, match="(?s)certificate verify failed.*[Hh]ostname mismatch"):
        run(asyncio.wait_for(_store(server.url, tls_ca_cert=str(ca)).start(), 10))
