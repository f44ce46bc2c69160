"""The OpenAI-compatible server, exercised over real HTTP on 127.0.0.1 with the openai client."""

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict

import httpx
import pytest
import torch

from gptlab.checkpoint import load_run, save_checkpoint, write_run_config
from gptlab.config import GenerationConfig, GPTConfig
from gptlab.model import GPT
from gptlab.tokenizer import ByteTokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


def make_run(path, template=None):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, context_length=256, n_layer=1, n_head=2, n_embd=32)
    values = {"task": "pretrain", "model": asdict(config)}
    if template:
        values["template"] = template
    write_run_config(path, values)
    ByteTokenizer().save(path / "tokenizer")
    save_checkpoint(path, 0, GPT(config).state_dict(), {})
    return load_run(path)


@contextmanager
def serving(app):
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(tmp_path):
    from gptlab.serve import create_app

    run = make_run(tmp_path / "run", template="alpaca")
    with serving(create_app(run, "tiny", GenerationConfig(max_new_tokens=8, temperature=0.0))) as url:
        yield url, run


def test_completions_match_local_greedy_generation(server):
    from gptlab.generate import generate

    url, run = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    response = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    expected = generate(run.model, run.tokenizer, "Hello", GenerationConfig(max_new_tokens=6, temperature=0.0))[0]
    assert response.choices[0].text == expected
    assert response.usage.prompt_tokens == 5
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_streams_pieces_that_join_to_the_full_reply(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=8, stream=True
        )
    ]
    assert full.choices[0].message.role == "assistant"
    assert "".join(pieces).strip() == full.choices[0].message.content


def test_bad_sampling_values_get_a_400_with_a_message(server):
    url, _ = server
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "temperature": -1})
    assert response.status_code == 400
    assert "temperature" in response.json()["error"]["message"]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and "role" in response.json()["error"]["message"]
