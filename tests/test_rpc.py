"""An HLWQ GGUF split across two ggml-rpc-server processes on loopback (llama.cpp's RPC backend, the way to run a
model that outgrows one machine): the weights and the HLWQ KV cache land on both servers and greedy generation
gives the same text as the local run."""
from __future__ import annotations

import re
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest

from convert import convert_checkpoint
from hlwq_gguf import serverload

from hlwq_gguf.testing.tiny_llama import write_tiny_llama

PROMPT = "The capital of France is"


@contextmanager
def rpc_servers(build, count: int):
    """`count` ggml-rpc-server processes bound to 127.0.0.1, each exposing its CPU; yields their endpoints."""
    servers, endpoints = [], []
    try:
        for _ in range(count):
            port = serverload.free_port()
            servers.append(subprocess.Popen([str(build.tool("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port),
                                             "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            endpoints.append(f"127.0.0.1:{port}")
        for server, endpoint in zip(servers, endpoints):
            deadline = time.time() + 30
            while True:
                assert server.poll() is None, f"ggml-rpc-server {endpoint} exited: {server.stderr.read()}"
                try:
                    socket.create_connection(tuple(endpoint.rsplit(":", 1)), timeout=1).close()
                    break
                except OSError:
                    assert time.time() < deadline, f"ggml-rpc-server {endpoint} never listened"
                    time.sleep(0.1)
        yield endpoints
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="module")
def tiny_hlwq5(tmp_path_factory, smollm2_hf, llama_build):
    root = tmp_path_factory.mktemp("rpc")
    # wide enough that each server's share of weights and cache shows in llama.cpp's MiB report
    folder = write_tiny_llama(root / "hf", smollm2_hf, hidden=256, intermediate=640, layers=4)
    return convert_checkpoint(folder, root / "tiny-hlwq5.gguf", recipe="hlwq5", quiet=True).output


def _complete(build, model, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [build.tool("llama-completion"), "-m", model, "-p", PROMPT, "-n", "16", "--temp", "0", "-no-cnv",
           "--no-warmup", "-c", "256", "-t", "1", "-fa", "on", "-ctk", "hlwq4_64", "-ctv", "hlwq4_64",
           # letters only: the random model would otherwise print newlines, which compare equal too easily
           "--grammar", "root ::= [a-zA-Z ]+", *extra]
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace",
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_hlwq_model_split_over_two_rpc_servers(tiny_hlwq5, llama_build):
    local = _complete(llama_build, tiny_hlwq5, ["-ngl", "0"])
    with rpc_servers(llama_build, 2) as endpoints:
        remote = _complete(llama_build, tiny_hlwq5, ["--rpc", ",".join(endpoints), "-ngl", "99", "-ts", "1,1", "-v"])
    # both servers hold a share of the HLWQ weights and of the HLWQ KV cache, as llama.cpp reports it
    # (the last report of each is the real load; llama.cpp first sizes the buffers in a dry run)
    for endpoint in endpoints:
        for buffer in ("model", "KV"):
            sizes = re.findall(rf"RPC\d+\[{re.escape(endpoint)}\] {buffer} buffer size = +([\d.]+) MiB", remote.stderr)
            assert sizes and float(sizes[-1]) > 0, f"no {buffer} buffer on {endpoint}: {remote.stderr[-3000:]}"
    assert re.search(r"type +hlwq5: +\d+ tensors", remote.stderr), remote.stderr[-3000:]
    assert remote.stdout.startswith(PROMPT) and len(remote.stdout.strip()) > len(PROMPT) + 8
    assert remote.stdout == local.stdout
