"""llama-server under concurrent load from the OpenAI Python client, on loopback: requests/s, latency
percentiles, errors and the server's memory before and after. scripts/server_load.py runs it on HLWQ5 with an
HLWQ KV cache beside Q5_K_M; tests/test_server_load.py on a tiny model."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .build import Build

PROMPTS = [
    "Write one sentence about the sea.", "What is the capital of France?", "Name three colours.",
    "Explain what a compiler does in one sentence.", "Give me a short list of fruits.",
    "Describe a cat in a few words.", "What comes after Monday?", "Say hello politely.",
]


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ServerError("no VmRSS for the server process")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def llama_server(build: Build, model: Path, log: Path, *, parallel: int = 8, ctx_per_slot: int = 512,
                 kv_type: str | None = None, threads: int | None = None, extra: tuple[str, ...] = ()):
    """A llama-server on 127.0.0.1 with `parallel` slots, flash attention and `kv_type` for K and V (llama.cpp's
    default f16 when None); stopped on exit."""
    port = free_port()
    cmd = [build.tool("llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(parallel * ctx_per_slot), "-t", str(threads or os.cpu_count() or 2), "-fa", "on", "--no-webui",
           *(["-ctk", kv_type, "-ctv", kv_type] if kv_type else []), *extra]
    with open(log, "w") as log_file:
        process = subprocess.Popen([str(c) for c in cmd], stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                raise ServerError(f"llama-server exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise ServerError(f"llama-server did not get healthy in 300 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield Server(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LoadResult:
    requests: int
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    empty_replies: int = 0
    completion_tokens: int = 0
    rss_before: int = 0
    rss_after: int = 0

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> dict:
        return {"requests": self.requests, "clients": self.clients, "errors": len(self.errors),
                "empty_replies": self.empty_replies, "seconds": round(self.seconds, 2),
                "requests_per_second": round(self.requests_per_second, 3),
                "p50_s": round(self.percentile(50), 3), "p99_s": round(self.percentile(99), 3),
                "completion_tokens_per_second": round(self.completion_tokens / self.seconds, 1),
                "rss_before_mib": round(self.rss_before / 2**20, 1), "rss_after_mib": round(self.rss_after / 2**20, 1)}


def _one_request(client, index: int, max_tokens: int, stream: bool) -> tuple[float, str, int]:
    messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
    # ignore_eos: every request generates max_tokens, so the load is the same whatever the model says
    kwargs = dict(model="served", messages=messages, max_tokens=max_tokens, temperature=0.0,
                  extra_body={"ignore_eos": True})
    started = time.perf_counter()
    if stream:
        pieces, tokens = [], 0
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                tokens += 1
        return time.perf_counter() - started, "".join(pieces), tokens
    response = client.chat.completions.create(**kwargs)
    return time.perf_counter() - started, response.choices[0].message.content or "", response.usage.completion_tokens


def run_load(server: Server, requests: int, clients: int = 8, max_tokens: int = 16, warmup: int = 16) -> LoadResult:
    """`requests` chat completions from `clients` concurrent OpenAI clients, every other one streamed; `warmup`
    requests first, so the memory baseline is taken with every slot used once."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=600)
    result = LoadResult(requests=requests, clients=clients, seconds=0.0)

    def safe(index: int):
        try:
            return _one_request(client, index, max_tokens, stream=index % 2 == 0)
        except Exception as e:  # every failure is counted and reported, the load goes on
            return f"request {index}: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(safe, range(warmup)))
        result.rss_before = server.rss_bytes()
        started = time.perf_counter()
        outcomes = list(pool.map(safe, range(requests)))
        result.seconds = time.perf_counter() - started
    result.rss_after = server.rss_bytes()
    for outcome in outcomes:
        if isinstance(outcome, str):
            result.errors.append(outcome)
            continue
        latency, text, tokens = outcome
        result.latencies.append(latency)
        result.completion_tokens += tokens
        result.empty_replies += not text
    return result
