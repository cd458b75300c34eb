"""The judge over real HTTP: vLLM's own OpenAI-compatible server (CPU, the tiny model), and an
aiohttp server speaking the same protocol with scripted verdicts and an API key check."""

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rlsys.reward.judge import JudgeConfig, JudgePair, JudgeQueue, OpenAIChatBackend

pytestmark = pytest.mark.integration

TEMPLATE = Path(__file__).parent.parent / "data" / "digits_chat_template.jinja"


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    port = _port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            tiny_model,
            "--served-model-name",
            "tiny-judge",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "64",
            "--chat-template",
            str(TEMPLATE),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("vLLM server did not come up in 180 s")
    yield url
    proc.terminate()
    proc.wait(30)


def _judge(url, **kw):
    cfg = JudgeConfig(backend="openai", url=url, model=kw.pop("model", "tiny-judge"), **kw)
    return JudgeQueue(cfg, OpenAIChatBackend(cfg))


def test_vllm_server_answers_are_garbage_to_the_strict_parser(vllm_server):
    q = _judge(vllm_server, timeout_s=60, max_tokens=4)
    out = asyncio.run(q.judge_pairs([JudgePair("12+34=", "46", "47")] * 3))
    assert out == [None] * 3 and q.stats.garbage == 3 and q.stats.calls == 3


def test_vllm_server_timeouts_fall_back(vllm_server):
    q = _judge(vllm_server, timeout_s=0.001, retries=1)
    out = asyncio.run(q.judge_pairs([JudgePair("1+1=", "2", "3")] * 2))
    assert out == [None, None] and q.stats.timeouts == 2 and q.stats.calls == 4


def test_unknown_model_is_an_error_fallback(vllm_server):
    q = _judge(vllm_server, model="no-such-model", retries=0)
    assert asyncio.run(q.judge_pairs([JudgePair("1+1=", "2", "3")])) == [None]
    assert q.stats.errors == 1


def test_scripted_openai_server_round_trip_with_api_key(monkeypatch):
    from aiohttp import web

    seen_auth = []

    async def chat(request):
        seen_auth.append(request.headers.get("Authorization"))
        body = await request.json()
        text = body["messages"][0]["content"]
        a = text.split("<response_a>\n")[1].split("\n</response_a>")[0]
        return web.json_response(
            {"choices": [{"message": {"role": "assistant", "content": "VERDICT: A" if a == "good" else "VERDICT: B"}}]}
        )

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            q = _judge(f"http://127.0.0.1:{port}/v1", model="scripted")
            out = await q.judge_pairs([JudgePair("p", "good", "bad"), JudgePair("p", "bad", "good")] * 4)
            await q.backend.aclose()
            return out, q
        finally:
            await runner.cleanup()

    monkeypatch.setenv("RLSYS_JUDGE_API_KEY", "sk-test-123")
    out, q = asyncio.run(scenario())
    assert out == [1, -1] * 4 and q.stats.verdicts == 8
    assert set(seen_auth) == {"Bearer sk-test-123"}
