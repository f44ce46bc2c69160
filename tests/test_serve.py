"""The OpenAI-compatible server, over real HTTP on 127.0.0.1 with the openai client and in process with TestClient."""

import dataclasses
import json
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
from gptlab.generate import GenerationWarning
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


def always_predicting(run, token):
    """The run with its model rigged so that greedy decoding always picks `token`: the final layer norm
    outputs ones and only `token`'s row of the head is non-zero."""
    with torch.no_grad():
        run.model.ln_f.weight.zero_()
        run.model.ln_f.bias.fill_(1.0)
        run.model.lm_head.weight.zero_()
        run.model.lm_head.weight[token] = 1.0
    return run


def in_process_client(run, **defaults):
    from fastapi.testclient import TestClient

    from gptlab.serve import create_app

    config = GenerationConfig(**{"max_new_tokens": 8, "temperature": 0.0, **defaults})
    return TestClient(create_app(run, "tiny", config), raise_server_exceptions=False)


def chat(content):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_400_when_overflow_is_an_error(tmp_path, stream):
    client = in_process_client(make_run(tmp_path / "run"), prompt_overflow="error")
    for path, body in [
        ("/v1/completions", {"prompt": "x" * 300}),
        ("/v1/chat/completions", {"messages": chat("x" * 300)}),
    ]:
        response = client.post(path, json={**body, "stream": stream})
        assert response.status_code == 400, path
        assert "context length is 256" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "x", "temperature": "NaN"}, "temperature: Input should be a finite number"),
        ("/v1/completions", {"prompt": "x", "top_p": "Infinity"}, "top_p: Input should be a finite number"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
        ("/v1/chat/completions", {"messages": []}, "no user message"),
        ("/v1/completions", {"prompt": "x", "seed": 99999999999999999999999}, "seed must be from 0 to 2**63 - 1"),
        ("/v1/completions", {"prompt": []}, "the prompt list is empty"),
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 5000},
            "max_tokens must be from 1 to this server's limit of 4096, got 5000",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."}]}, "no user message"),
    ],
)
def test_requests_that_cannot_be_answered_are_400s_with_a_message(tmp_path, path, body, message):
    response = in_process_client(make_run(tmp_path / "run")).post(path, json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_body_that_is_not_json_is_a_400_saying_so(tmp_path):
    client = in_process_client(make_run(tmp_path / "run"))
    response = client.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the request body is not valid JSON")
    for sent in ({"content": b'{"prompt": "x"}'}, {"json": ["x"]}):  # no JSON content-type; not an object
        response = client.post("/v1/completions", **sent)
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("the request body must be a JSON object, sent with")


def stream_events(response):
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_usage_and_finish_reason_come_from_the_decoding(tmp_path):
    client = in_process_client(always_predicting(make_run(tmp_path / "run"), 255))  # byte 0xff: invalid UTF-8
    body = client.post("/v1/completions", json={"prompt": "", "max_tokens": 5}).json()
    assert body["choices"][0]["text"] == "\ufffd" * 5  # re-encoded, that text would be 15 tokens
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}  # from end-of-text
    with pytest.warns(GenerationWarning, match="keeping the last 256"):
        body = client.post("/v1/completions", json={"prompt": "a" * 600, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == 256  # the context's worth the model read, not the 600 sent
    events = stream_events(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == "\ufffd" * 3
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"

    client = in_process_client(always_predicting(make_run(tmp_path / "spaces", template="alpaca"), ord(" ")))
    body = client.post("/v1/chat/completions", json={"messages": chat("hi"), "max_tokens": 4}).json()
    assert body["choices"][0]["message"]["content"] == ""  # the spaces are stripped, but they were generated
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    request = {"messages": chat("hi"), "max_tokens": 4, "stream": True}
    assert (
        stream_events(client.post("/v1/chat/completions", json=request))[-1]["choices"][0]["finish_reason"] == "length"
    )
    body = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "stop": "   "}).json()
    assert (
        body["choices"][0] == {"index": 0, "text": "", "finish_reason": "stop"}
        and body["usage"]["completion_tokens"] == 3
    )

    client = in_process_client(always_predicting(make_run(tmp_path / "eot"), ByteTokenizer().eot_id))
    body = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6}).json()
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1


def test_a_port_out_of_range_or_in_use_is_a_one_line_error(tmp_path, capsys):
    from gptlab.cli import main

    make_run(tmp_path / "run")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        in_use = taken.getsockname()[1]
        for port, message in [
            (99999, "the port must be from 0 to 65535, got 99999"),
            (in_use, "Address already in use"),
        ]:
            assert main(["serve", str(tmp_path / "run"), "--port", str(port)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_run_without_a_template_chats_on_its_messages_a_line_each(tmp_path):
    client = in_process_client(make_run(tmp_path / "run"))  # a plain language model: no template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == len(b"Be brief.\nhi")
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and "unknown message role 'robot'" in response.json()["error"]["message"]


def test_a_streamed_reply_drops_its_leading_space_as_the_whole_reply_does(tmp_path):
    client = in_process_client(always_predicting(make_run(tmp_path / "spaces", template="alpaca"), ord(" ")))
    request = {"messages": chat("hi"), "max_tokens": 4}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    events = stream_events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole == ""


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "x", "temprature": 0}, "unknown field 'temprature'"),
        ("/v1/completions", {"prompt": "x", "logprobs": 5}, "logprobs is not supported by this server"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of is not supported"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, "use repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias is not supported"),
        ("/v1/completions", {"prompt": [3, 300]}, "prompt token id 300 is outside the vocabulary (0 to 256)"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "only allowed with stream"),
        ("/v1/chat/completions", {"messages": chat("x"), "logprobs": True}, "logprobs is not supported"),
        ("/v1/chat/completions", {"messages": chat("x"), "tools": [{"type": "function"}]}, "no tool calling"),
        ("/v1/chat/completions", {"messages": chat("x"), "response_format": {"type": "json_object"}}, "only text"),
        (
            "/v1/chat/completions",
            {"messages": chat("x"), "max_completion_tokens": 9999},
            "max_completion_tokens must be",
        ),
        ("/v1/chat/completions", {"messages": chat("x"), "max_completion_tokens": 0}, "max_completion_tokens must be"),
        (
            "/v1/chat/completions",
            {"messages": chat("x"), "max_completion_tokens": 3, "max_tokens": 9999},
            "max_tokens must",
        ),
        ("/v1/completions", {"prompt": "x", "logprobs": 0}, "logprobs is not supported"),
        ("/v1/chat/completions", {"messages": chat("x"), "reasoning_effort": "low"}, "the model does not reason"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt must be a text, a list of texts, or token ids"),
        ("/v1/completions", {"prompt": [True, False]}, "prompt must be a text, a list of texts, or token ids"),
        ("/v1/completions", {"prompt": [1.0, 2.0]}, "prompt must be a text, a list of texts, or token ids"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "needs its text"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "only text message content is supported, got image_url",
        ),
    ],
)
def test_openai_fields_the_server_cannot_honour_are_refused_by_name(tmp_path, path, body, message):
    response = in_process_client(make_run(tmp_path / "run")).post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and message in error["message"]
    assert error["code"] is None and error["param"] in body  # OpenAI's error shape: the field at fault


def test_openai_fields_at_the_values_that_ask_for_nothing_are_accepted(tmp_path):
    client = in_process_client(make_run(tmp_path / "run"))
    defaults = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "user": "me", "max_tokens": 2,
                "service_tier": "auto"}  # fmt: skip
    assert client.post("/v1/completions", json={"prompt": "x", "logprobs": None, "echo": False, **defaults}).is_success
    chat_defaults = {"logprobs": False, "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
                     "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}  # fmt: skip
    messages = [*chat("x"), {"role": "assistant", "content": None}, *chat("y")]  # a turn without content
    response = client.post("/v1/chat/completions", json={"messages": messages, **chat_defaults, **defaults})
    events = stream_events(response)
    assert response.is_success and all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]


def test_token_id_prompts_echo_and_the_newer_chat_fields(tmp_path):
    client = in_process_client(make_run(tmp_path / "run", template="alpaca"))
    text = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).json()["choices"][0]["text"]
    by_ids = client.post("/v1/completions", json={"prompt": [72, 105], "max_tokens": 4}).json()
    assert by_ids["choices"][0]["text"] == text and by_ids["usage"]["prompt_tokens"] == 2
    several = client.post("/v1/completions", json={"prompt": [[72, 105], [72, 105]], "max_tokens": 4}).json()
    assert [c["text"] for c in several["choices"]] == [text, text]
    echoed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Hi" + text
    events = stream_events(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "echo": True,
                                                                "stream": True}))  # fmt: skip
    assert "".join(e["choices"][0]["text"] for e in events) == "Hi" + text

    # Content as a list of text parts, and "developer" as the system message, read as the plain forms.
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    newer = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]  # fmt: skip
    reply = client.post("/v1/chat/completions", json={"messages": plain, "max_tokens": 5}).json()
    again = client.post("/v1/chat/completions", json={"messages": newer, "max_completion_tokens": 5}).json()
    assert again["choices"][0]["message"] == reply["choices"][0]["message"] and again["usage"] == reply["usage"]


def test_stream_options_include_usage_ends_the_stream_with_the_usage(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="tiny", messages=chat("Name a colour."), max_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    full = client.chat.completions.create(model="tiny", messages=chat("Name a colour."), max_tokens=5, temperature=0)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(chunk.choices for chunk in chunks[:-1])


def hold_first_batch(app):
    """Make the app's decoder wait before its first batch until the returned event is set, so that the
    requests sent meanwhile are all waiting when it takes the next."""
    batcher, release = app.state.batcher, threading.Event()
    decode = batcher._decode

    def held(batch):
        release.wait(30)
        decode(batch)

    batcher._decode = held
    return batcher, release


def wait_for(condition, seconds=30):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_with_the_same_settings_join_the_running_batch(tmp_path):
    from gptlab.generate import generate
    from gptlab.serve import create_app

    run = make_run(tmp_path / "run")
    app = create_app(run, "tiny", GenerationConfig(max_new_tokens=6, temperature=0.0))
    batcher, release = hold_first_batch(app)
    prompts, replies = ["Hello", "A longer prompt than the others", "x", "abc"], {}

    def ask(prompt):
        body = {"prompt": prompt, "max_tokens": 6}
        replies[prompt] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with serving(app) as url:
        threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts]
        threads[0].start()
        wait_for(lambda: list(batcher.batch_sizes) == [1])  # the first request is being decoded (held)
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: len(batcher.waiting) == 3)
        release.set()
        for thread in threads:
            thread.join(60)
    assert list(batcher.batch_sizes) == [1] and list(batcher.joined) == [3]  # they joined the running batch
    assert [replies[p] for p in prompts] == generate(
        run.model, run.tokenizer, prompts, GenerationConfig(max_new_tokens=6, temperature=0.0)
    )


def test_unseeded_requests_share_a_batch_and_seeded_ones_run_alone(tmp_path):
    from gptlab.serve import _Job, _Outcome, create_app

    app = create_app(make_run(tmp_path / "run"), "tiny")
    batcher, release = hold_first_batch(app)
    greedy = GenerationConfig(max_new_tokens=3, temperature=0.0)
    settings = [greedy, dataclasses.replace(greedy, seed=1), greedy, dataclasses.replace(greedy, temperature=0.5),
                greedy, dataclasses.replace(greedy, seed=1)]  # fmt: skip
    jobs = [_Job([65], config, _Outcome(1)) for config in settings]
    batcher.submit(jobs[:1])
    wait_for(lambda: list(batcher.batch_sizes) == [1])
    batcher.submit(jobs[1:])
    release.set()
    texts = ["".join(job.read()) for job in jobs]
    # In order: the held first; the seeded one alone; the two other greedy ones and the sampled one
    # together (rows keep their own sampling settings); the second seeded one alone, though its settings
    # equal the first seeded one's.
    assert list(batcher.batch_sizes) == [1, 1, 3, 1]
    assert texts[0] == texts[2] == texts[4] and texts[1] == texts[5]
