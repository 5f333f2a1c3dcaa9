"""`bicache-jax serve`: the real server on a free localhost port, a real HTTP client.

Most tests share one server (uvicorn in a thread of this process, so its compiled
programs are shared with the `generate` calls that check its tokens); the SIGTERM test
runs the CLI in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from server_fixtures import EOS_ID, WORDS, chat_model_folder

from bicache_jax.generate import Prompt, generate
from bicache_jax.server import (
    ServerSettings,
    create_app,
    load_served_model,
    uvicorn_server,
)

POLICY = "bicache"
GEN = {"max_tokens": 8, "block_length": 4}  # two blocks: two stream events
SETTINGS = ServerSettings(policy=POLICY, max_batch=8, max_tokens=8, block_length=4,
                          max_tokens_limit=64, batch_window_s=0.05)
SYSTEM = " ".join(WORDS[:15])


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_served_model(chat_model_folder(tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def server(model):
    """(base url, the app's `App`): uvicorn serving the app in a thread."""
    app = create_app(model, SETTINGS)
    sock = _free_socket()
    srv = uvicorn_server(app, "127.0.0.1", 0, "warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.bicache
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=120) as c:
        yield c


def chat(*user: str, system: str = SYSTEM) -> list[dict]:
    msgs = [{"role": "system", "content": system}]
    for i, u in enumerate(user):
        if i:
            msgs.append({"role": "assistant", "content": "w1 w2"})
        msgs.append({"role": "user", "content": u})
    return msgs


def alone(model, messages: list[dict], policy: str = POLICY) -> np.ndarray:
    """`generate` on this one request, as the server should run it."""
    prefix, prompt = model.tokenizer.split_conversation(messages)
    return generate(model.params, [Prompt(prompt=prompt, prefix=prefix)], None,
                    config=model.config, policy=policy, gen_length=8, block_length=4,
                    reuse_depth=model.config.n_layers // 2).tokens[0]


def test_chat_round_trip_and_store_hit(client, server, model):
    system = " ".join(WORDS[30:45])
    first = client.post("/v1/chat/completions", json={"messages": chat("w3 w4", system=system),
                                                      **GEN})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "chat.completion" and body["model"] == model.name
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in (
        "stop", "length")
    tokens = body["bicache"]["tokens"]
    np.testing.assert_array_equal(tokens, alone(model, chat("w3 w4", system=system)))
    ids = tokens[:tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
    assert choice["message"]["content"] == model.tokenizer.decode(ids)
    usage = body["usage"]
    prefix, prompt = model.tokenizer.split_conversation(chat("w3 w4", system=system))
    assert usage["prompt_tokens"] == len(prefix) + len(prompt)
    assert usage["completion_tokens"] == len(ids)
    assert usage["cached_prefix_tokens"] == 0  # the first with this system prompt: a miss
    assert usage["reuse_depth"] == model.config.n_layers // 2

    hits = _metric(client, "bicache_store_hits_total")
    second = client.post("/v1/chat/completions",
                         json={"messages": chat("w5", system=system), **GEN}).json()
    assert second["usage"]["cached_prefix_tokens"] == len(prefix) == 16
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prefix)
    assert second["bicache"]["cache_hit"] is True
    assert _metric(client, "bicache_store_hits_total") == hits + 1

    done = client.post("/v1/completions", json={"prompt": "w7 w8", "prefix": system,
                                                **GEN}).json()
    assert done["object"] == "text_completion" and done["usage"]["cached_prefix_tokens"] == 0
    assert isinstance(done["choices"][0]["text"], str)


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_models_metrics(client, model):
    assert client.get("/health").json()["status"] == "ok"
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [model.name]
    assert data[0]["max_model_len"] == model.config.max_seq_len
    text = client.get("/metrics").text
    for name in ("http_requests_total", "batches_total", "queue_length", "store_hits_total",
                 "store_misses_total", "store_evictions_total", "store_bytes",
                 "tokens_per_second", "compiles_total"):
        assert f"# TYPE bicache_{name} " in text, name


def test_concurrent_requests_match_generate_alone(server, model):
    """32 chats sharing a system prompt, sent at once: all answered, each with the tokens of
    `generate` on it alone, batched (bucket 8), all but the first batch's hitting the store."""
    questions = [" ".join(WORDS[(3 * i) % 50:(3 * i) % 50 + 1 + i % 3]) for i in range(32)]
    system = " ".join(WORDS[5:20])  # 16 prefix tokens, as the other tests: one compile
    batcher = server[1].batcher
    # A window long enough for all 32 to arrive: the rounds fill batches of 8 (one shape).
    batcher.batch_window_s = 5.0

    async def send_all():
        async with httpx.AsyncClient(base_url=server[0], timeout=120) as c:
            return await asyncio.gather(*[
                c.post("/v1/chat/completions", json={"messages": chat(q, system=system), **GEN})
                for q in questions])

    try:
        replies = asyncio.run(send_all())
    finally:
        batcher.batch_window_s = SETTINGS.batch_window_s
    assert [r.status_code for r in replies] == [200] * 32
    bodies = [r.json() for r in replies]
    for q, b in zip(questions, bodies, strict=True):
        np.testing.assert_array_equal(b["bicache"]["tokens"], alone(model, chat(q, system=system)))
    assert max(b["bicache"]["batch_size"] for b in bodies) == 8
    misses = sum(not b["bicache"]["cache_hit"] for b in bodies)
    assert misses <= 8  # only the first batch computed the system prompt
    assert len({tuple(b["bicache"]["tokens"]) for b in bodies}) > 4, "degenerate model"


def test_streaming_one_event_per_block_then_done(client, model):
    messages = chat("w9 w10")
    plain = client.post("/v1/chat/completions", json={"messages": messages, **GEN}).json()
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": messages, "stream": True,
                             "stream_options": {"include_usage": True}, **GEN}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    chunks, usage = events[:-1], events[-1]
    assert [c["block"] for c in chunks] == list(range(len(chunks)))
    assert 1 <= len(chunks) <= 2  # one per block (fewer when a stop ends the reply early)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert usage["choices"] == []
    for name in ("prompt_tokens", "completion_tokens", "reuse_depth"):
        assert usage["usage"][name] == plain["usage"][name]
    assert usage["bicache"]["tokens"] == plain["bicache"]["tokens"]


LONG = " ".join(WORDS * 3)  # 150 words: beyond the model's 128-token context
BAD = [  # (endpoint, raw body or JSON value, expected status, expected param)
    ("chat", b"{not json", 400, None),
    ("chat", b"\xff\xfe", 400, None),
    ("chat", [1, 2], 400, None),
    ("chat", {"messages": "w1"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "wizard", "content": "w1"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": "w1"},
                           {"role": "assistant", "content": "w2"}]}, 400, "messages[1].role"),
    ("chat", {"messages": chat("w1"), "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": chat("w1"), "max_tokens": 10**9}, 400, "max_tokens"),
    ("chat", {"messages": chat("w1"), "max_tokens": "8"}, 400, "max_tokens"),
    ("chat", {"messages": chat("w1"), "max_tokens": 8.5}, 400, "max_tokens"),
    ("chat", {"messages": chat("w1"), "max_tokens": True}, 400, "max_tokens"),
    ("chat", {"messages": chat("w1"), "temperature": "hot"}, 400, "temperature"),
    ("chat", {"messages": chat("w1"), "temperature": -1}, 400, "temperature"),
    ("chat", {"messages": chat("w1"), "top_p": 0}, 400, "top_p"),
    ("chat", {"messages": chat("w1"), "top_p": 0.5}, 400, "top_p"),
    ("chat", {"messages": chat("w1"), "stream": "yes"}, 400, "stream"),
    ("chat", {"messages": chat("w1"), "stop": 3}, 400, "stop"),
    ("chat", {"messages": chat("w1"), "stop": ["a", ""]}, 400, "stop"),
    ("chat", {"messages": chat("w1"), "n": 2}, 400, "n"),
    ("chat", {"messages": chat("w1"), "policy": "magic"}, 400, "policy"),
    ("chat", {"messages": chat("w1"), "policy": 3}, 400, "policy"),
    ("chat", {"messages": chat("w1"), "threshold": 1.5}, 400, "threshold"),
    ("chat", {"messages": chat("w1"), "steps": 3, **GEN}, 400, None),  # 2 blocks
    ("chat", {"messages": chat("w1"), "frobnicate": 1}, 400, "frobnicate"),
    ("chat", {"messages": chat(LONG)}, 400, "messages"),
    ("chat", {"messages": chat("w1"), "model": "gpt-4"}, 404, "model"),
    ("completions", {"prompt": LONG}, 400, "prompt"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": [[1, 2], [3]]}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 59]}, 400, None),  # the mask token id
    ("completions", {"prompt": [1, 2, 600]}, 400, None),  # outside the vocabulary
    ("completions", {"prompt": "w1", "messages": chat("w1")}, 400, "messages"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD,
                         ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_json_4xx(client, endpoint, body, status, param):
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[endpoint]
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert client.get("/health").status_code == 200


def test_unknown_route_and_queue_full(client, server):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    batcher = server[1].batcher
    batcher.max_queue = 0  # no room: the next request is refused before queueing
    try:
        r = client.post("/v1/chat/completions", json={"messages": chat("w1"), **GEN})
    finally:
        batcher.max_queue = SETTINGS.max_queue
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert _metric(client, "bicache_rejected_queue_full_total") == 1
    assert client.get("/health").status_code == 200


def test_a_failing_batch_is_a_500_and_the_server_goes_on(client, monkeypatch):
    from bicache_jax import serving

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(serving, "generate", broken)
    r = client.post("/v1/chat/completions", json={"messages": chat("w2"), **GEN})
    assert r.status_code == 500, r.text
    assert "device lost" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    r = client.post("/v1/chat/completions", json={"messages": chat("w2"), **GEN})
    assert r.status_code == 200, r.text


def test_sigterm_drains_the_request_in_flight(tmp_path):
    """The CLI server gets SIGTERM while a request is being computed (its first, so it
    compiles for seconds): the request is answered, then the process exits 0."""
    folder = chat_model_folder(tmp_path / "tiny")
    port = _free_socket().getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bicache_jax.cli", "serve", "--model", str(folder), "--port",
         str(port), "--policy", "none", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        reply = {}
        sender = threading.Thread(target=lambda: reply.update(r=httpx.post(
            url + "/v1/completions", json={"prompt": "w1 w2 w3", **GEN}, timeout=120)))
        sender.start()
        time.sleep(0.5)
        assert sender.is_alive(), "the request finished before SIGTERM: nothing in flight"
        proc.send_signal(signal.SIGTERM)
        sender.join(120)
        assert proc.wait(60) == 0, proc.stdout.read()
        assert reply["r"].status_code == 200, reply["r"].text
        assert len(reply["r"].json()["bicache"]["tokens"]) == 8
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_sequences_truncate_the_text(client):
    messages = chat("w11 w12")
    plain = client.post("/v1/chat/completions", json={"messages": messages, **GEN}).json()
    text = plain["choices"][0]["message"]["content"]
    words = text.split(" ")
    assert len(words) >= 2, text
    stop = " " + words[1]
    cut = client.post("/v1/chat/completions",
                      json={"messages": messages, "stop": [stop, "never there"], **GEN}).json()
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["bicache"]["tokens"] == plain["bicache"]["tokens"]


def test_a_model_without_tokenizer_is_refused_in_one_line(tmp_path):
    from hf_fixtures import llada_folder

    folder, _, _ = llada_folder(tmp_path / "bare")
    proc = subprocess.run([sys.executable, "-m", "bicache_jax.cli", "serve", "--model",
                           str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer" in lines[0], proc.stderr


def test_text_stream_holds_back_a_possible_stop_sequence():
    from bicache_jax.server import _TextStream

    s = _TextStream(["END"])
    assert s.push("hello E", final=False) == "hello"  # " E" could still end in "END"
    assert s.push("hello EN", final=False) == " "
    assert s.push("hello ENX more", final=False) == "ENX mo"
    assert s.push("hello ENX more", final=True) == "re"
    u = _TextStream([])
    assert u.push("caf\ufffd", final=False) == "caf"  # a cut multi-byte character waits
    assert u.push("café", final=True) == "é"
