"""llama-server serving an HLWQ GGUF with an HLWQ KV cache under concurrent load from the OpenAI client
(8 clients, streaming and not): no errors, every reply has its tokens, the server survives, memory stays flat.
Throughput and latency against Q5_K_M on a real model: scripts/server_load.py (numbers in docs/BENCHMARKS.md)."""
from __future__ import annotations

import pytest

from convert import convert_checkpoint
from hlwq_gguf import serverload

from hlwq_gguf.testing.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_hlwq5(tmp_path_factory, smollm2_hf, llama_build):
    root = tmp_path_factory.mktemp("serve")
    return convert_checkpoint(write_tiny_llama(root / "hf", smollm2_hf, hidden=256, intermediate=640, layers=4),
                              root / "tiny-hlwq5.gguf", recipe="hlwq5", quiet=True).output


def test_hlwq_server_under_concurrent_load(tiny_hlwq5, llama_build, tmp_path):
    with serverload.llama_server(llama_build, tiny_hlwq5, tmp_path / "server.log", parallel=8, ctx_per_slot=256,
                                 kv_type="hlwq4_64", extra=("-v",)) as server:  # -v: the cache line is logged
        result = serverload.run_load(server, requests=200, clients=8, max_tokens=12)
        alive = server.process.poll() is None
    log = (tmp_path / "server.log").read_text()
    print(result.summary())
    assert not result.errors, result.errors[:3]
    assert alive
    assert "K (hlwq4_64)" in log and "V (hlwq4_64)" in log, log[:3000]
    assert result.empty_replies == 0 and result.completion_tokens >= 200 * 10
    assert len(result.latencies) == 200
    # the slots and the cache were all allocated in the warm-up: the load itself must not grow the server
    assert result.rss_after < result.rss_before * 1.05 + 32 * 2**20, result.summary()
