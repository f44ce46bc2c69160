"""The server's batching (serve.Batcher) and streaming paths under concurrent clients: batched replies equal the
replies decoded alone, rows of one batch end at their own points, a seeded request is not mixed in,
a failed batch does not stop the decoder, and a client that leaves a stream frees the decoder."""

import gc
import json
import threading
import time
import warnings

import httpx
import pytest

from gptlab.config import GenerationConfig
from gptlab.generate import GenerationWarning
from test_serve import hold_first_batch, make_run, serving, stream_events, wait_for

pytest.importorskip("uvicorn")

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)


def batched_app(run, **defaults):
    """The app for `run` with its decoder held before its first batch (see `hold_first_batch`)."""
    from gptlab.serve import create_app

    app = create_app(run, "tiny", GenerationConfig(**{**vars(GREEDY), **defaults}))
    batcher, release = hold_first_batch(app)
    return app, batcher, release


def send_together(url, batcher, release, requests):
    """Send `requests` ((key, path, body)) while the decoder is held, so that they wait together; then
    release it. Returns {key: parsed reply} (a streamed reply as its list of events)."""
    replies = {}

    def ask(key, path, body):
        response = httpx.post(f"{url}{path}", json=body, timeout=60)
        replies[key] = stream_events(response) if body.get("stream") else response.json()

    # The held request is seeded, so it runs alone: the others wait for a batch of their own.
    held = {"prompt": "z", "max_tokens": 1, "seed": 1}
    holder = threading.Thread(target=ask, args=("held", "/v1/completions", held))
    holder.start()
    wait_for(lambda: list(batcher.batch_sizes) == [1])
    threads = [threading.Thread(target=ask, args=request) for request in requests]
    expected = 0
    for thread, (_, _, body) in zip(threads, requests, strict=True):
        thread.start()
        prompt = body.get("prompt")
        expected += len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1
        wait_for(lambda expected=expected: len(batcher.waiting) == expected)  # submitted in this order
    release.set()
    for thread in [holder, *threads]:
        thread.join(60)
    return replies


def streamed_text(events):
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def test_batched_replies_and_usage_equal_the_replies_decoded_alone(tmp_path):
    """Prompts of very different lengths (one at the context's edge, so its window slides while the
    others do not; one truncated) in one batch, plain and streamed with include_usage: every text and
    usage equals the same request's answer when it is decoded alone."""
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run)
    prompts = ["Hello", "x" * 250, "abc", "a" * 300]
    requests = []
    for i, prompt in enumerate(prompts):
        body = {"prompt": prompt, "max_tokens": 40}
        requests.append((("plain", i), "/v1/completions", body))
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        requests.append((("stream", i), "/v1/completions", streamed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenerationWarning)  # the 300-byte prompt is truncated
        with serving(app) as url:
            replies = send_together(url, batcher, release, requests)
            assert list(batcher.batch_sizes) == [1, len(requests)]
            alone = [
                httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 40}, timeout=60).json()
                for p in prompts
            ]
    assert list(batcher.batch_sizes)[2:] == [1] * len(prompts)
    for i, reply in enumerate(alone):
        plain, events = replies[("plain", i)], replies[("stream", i)]
        assert plain["choices"][0]["text"] == streamed_text(events) == reply["choices"][0]["text"], i
        assert plain["usage"] == events[-1]["usage"] == reply["usage"], i
        assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "length"
    assert [r["usage"]["prompt_tokens"] for r in alone] == [5, 250, 3, 256]


def test_rows_of_one_batch_stop_at_their_own_stop_string_and_the_others_go_on(tmp_path):
    """Greedy, this tiny model continues "abc" with "cceee...", "Once upon" with "nnnnSSS..." and the
    others without "ee" or "SS": in one batch (and split over batches of 3), those two end at their
    stop string, counted to there, while the rest run to max_tokens, in a multi-prompt request too."""
    from gptlab.generate import generate

    run = make_run(tmp_path / "run")
    prompts = ["Hello", "abc", "The quick brown fox", "Once upon"]
    config = GenerationConfig(max_new_tokens=30, temperature=0.0, stop=["ee", "SS"])
    expected = generate(run.model, run.tokenizer, prompts, config)
    assert expected[1] == "cc" and expected[3] == "nnnn" and all(len(expected[i]) == 30 for i in (0, 2))
    app, batcher, release = batched_app(run, batch_size=3)
    body = {"max_tokens": 30, "stop": ["ee", "SS"]}
    requests = [(i, "/v1/completions", {**body, "prompt": p}) for i, p in enumerate(prompts)]
    requests.append(("multi", "/v1/completions", {**body, "prompt": prompts}))
    requests.append(("stream", "/v1/completions", {**body, "prompt": "abc", "stream": True}))
    with serving(app) as url:
        replies = send_together(url, batcher, release, requests)
    # The held request's settings differ, so the nine rows start a batch of 3, and the other six join it
    # as its rows end.
    assert list(batcher.batch_sizes) == [1, 3] and sum(batcher.joined) == 6
    singles = [replies[i]["choices"][0] for i in range(len(prompts))]
    assert [c["text"] for c in singles] == [c["text"] for c in replies["multi"]["choices"]] == expected
    assert [c["finish_reason"] for c in singles] == ["length", "stop", "length", "stop"]
    assert [replies[i]["usage"]["completion_tokens"] for i in range(len(prompts))] == [30, 4, 30, 6]
    assert replies["multi"]["usage"]["completion_tokens"] == 70
    assert streamed_text(replies["stream"]) == "cc"
    assert replies["stream"][-1]["choices"][0]["finish_reason"] == "stop"


def test_requests_arriving_during_a_batch_join_it_each_with_its_own_length_and_stop(tmp_path):
    """Continuous batching: requests sent while a batch decodes join it as its rows end, though their
    max_tokens and stop strings differ from it and from each other, and each gets what it gets alone."""
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run, batch_size=2)
    bodies = [{"prompt": "Hello", "max_tokens": 30}, {"prompt": "abc", "max_tokens": 12, "stop": ["ee"]},
              {"prompt": "Once upon", "max_tokens": 9}, {"prompt": "The quick brown fox", "max_tokens": 20},
              {"prompt": "Once upon", "max_tokens": 25, "stop": ["SS"]}]  # fmt: skip
    replies = {}

    def ask(i):
        replies[i] = httpx.post(f"{url}/v1/completions", json=bodies[i], timeout=60).json()

    with serving(app) as url:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        threads[0].start()
        wait_for(lambda: list(batcher.batch_sizes) == [1])  # the first is held: the others arrive while it runs
        for i, thread in enumerate(threads[1:], 1):
            thread.start()
            wait_for(lambda i=i: len(batcher.waiting) == i)
        release.set()
        for thread in threads:
            thread.join(60)
        alone = [httpx.post(f"{url}/v1/completions", json=body, timeout=60).json() for body in bodies]
    assert list(batcher.batch_sizes)[0] == 1 and sum(list(batcher.joined)[: len(bodies) - 1]) == len(bodies) - 1
    texts = [replies[i]["choices"][0]["text"] for i in range(len(bodies))]
    assert texts == [reply["choices"][0]["text"] for reply in alone]
    assert [len(t) for t in texts] == [30, 2, 9, 20, 4]  # "abc" stops at "ee", the last "Once upon" at "SS"
    assert [replies[i]["choices"][0]["finish_reason"] for i in range(len(bodies))] == [
        "length", "stop", "length", "length", "stop"]  # fmt: skip


def test_requests_with_different_sampling_settings_share_a_batch(tmp_path):
    """Greedy, a repetition penalty, top-k 1 and plain sampling in one batch: each row is sampled by its own
    settings, so the ones without randomness answer what they answer alone."""
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run)
    base = {"prompt": "Hello", "max_tokens": 12}
    bodies = {"greedy": {**base, "temperature": 0}, "penalty": {**base, "temperature": 0, "repetition_penalty": 1.3},
              "top1": {**base, "temperature": 1.0, "top_k": 1}, "sampled": {**base, "temperature": 1.0}}  # fmt: skip
    requests = [(key, "/v1/completions", body) for key, body in bodies.items()]
    with serving(app) as url:
        replies = send_together(url, batcher, release, requests)
        alone = {key: httpx.post(f"{url}/v1/completions", json=body, timeout=60).json() for key, body in bodies.items()}
    assert list(batcher.batch_sizes)[:2] == [1, 4]  # the four together, after the held one
    text = {key: reply["choices"][0]["text"] for key, reply in replies.items()}
    for key in ("greedy", "penalty", "top1"):
        assert text[key] == alone[key]["choices"][0]["text"], key
    assert text["top1"] == text["greedy"] and replies["sampled"]["usage"]["completion_tokens"] == 12


def test_a_seeded_request_among_unseeded_ones_runs_alone_and_repeats(tmp_path):
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run)
    sampled = {"prompt": "Hello", "max_tokens": 20, "temperature": 1.0}
    requests = [(0, "/v1/completions", sampled), ("seeded", "/v1/completions", {**sampled, "seed": 3}),
                (1, "/v1/completions", sampled), (2, "/v1/completions", sampled)]  # fmt: skip
    with serving(app) as url:
        replies = send_together(url, batcher, release, requests)
        again = httpx.post(f"{url}/v1/completions", json={**sampled, "seed": 3}, timeout=60).json()
    assert list(batcher.batch_sizes) == [1, 3, 1, 1]  # the three unseeded together; the seeded alone, twice
    assert replies["seeded"]["choices"][0]["text"] == again["choices"][0]["text"]
    assert len({replies[i]["choices"][0]["text"] for i in range(3)}) > 1  # sampled rows differ


def test_a_batch_that_fails_fails_its_requests_and_the_decoder_goes_on(tmp_path):
    """An exception while decoding a batch answers that batch's requests with a server error in OpenAI's shape
    (a 500, or a streamed reply's last event, without [DONE]) and the decoder thread survives: the next
    requests are answered as before."""
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run)
    real, failures = run.model.hidden_states, [True]

    def failing_in_a_batch_of_two(ids, *args, **kwargs):
        if failures and ids.shape[0] == 2:
            failures.pop()
            raise RuntimeError("decoding failed")
        return real(ids, *args, **kwargs)

    run.model.hidden_states = failing_in_a_batch_of_two
    outcomes = {}

    def ask(key, body):
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            outcomes[key] = (response.status_code, response.text)
        except httpx.RemoteProtocolError:
            outcomes[key] = "cut off"

    with serving(app) as url:
        # (seeded, so it runs alone and the next two start a batch of their own, which fails)
        holder = threading.Thread(target=ask, args=("held", {"prompt": "Hello", "max_tokens": 5, "seed": 1}))
        holder.start()
        wait_for(lambda: list(batcher.batch_sizes) == [1])
        threads = [threading.Thread(target=ask, args=(0, {"prompt": "Hello", "max_tokens": 5})),
                   threading.Thread(target=ask, args=(1, {"prompt": "Hello", "max_tokens": 5, "stream": True}))]  # fmt: skip
        for thread in threads:
            thread.start()
        wait_for(lambda: len(batcher.waiting) == 2)
        release.set()
        wait_for(lambda: len(outcomes) == 3)
        after = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 5}, timeout=30)
    assert list(batcher.batch_sizes) == [1, 2, 1] and not failures  # both requests were in the failed batch
    assert outcomes["held"][0] == 200
    status, text = outcomes[0]
    assert status == 500 and json.loads(text)["error"]["type"] == "server_error" and "decoding failed" in text
    status, text = outcomes[1]
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    assert status == 200 and json.loads(last[6:])["error"]["type"] == "server_error" and "[DONE]" not in text
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5


def test_a_request_whose_prefill_fails_as_it_joins_fails_alone(tmp_path):
    """A joining request's failure (here in its prefill) answers it with a server error; the request whose
    batch it joined is decoded on to its whole reply, and the next requests are answered as before."""
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run)
    real = run.model.hidden_states

    def failing_on_hash(ids, *args, **kwargs):  # the prefill of a prompt holding "#"
        if ids.shape[1] > 1 and bool((ids == ord("#")).any()):
            raise RuntimeError("prefill failed")
        return real(ids, *args, **kwargs)

    run.model.hidden_states = failing_on_hash
    outcomes = {}

    def ask(key, body):
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        outcomes[key] = (response.status_code, response.json())

    with serving(app) as url:
        good = threading.Thread(target=ask, args=("good", {"prompt": "Hello", "max_tokens": 20}))
        good.start()
        wait_for(lambda: list(batcher.batch_sizes) == [1])
        bad = threading.Thread(target=ask, args=("bad", {"prompt": "#fail", "max_tokens": 20}))
        bad.start()
        wait_for(lambda: len(batcher.waiting) == 1)
        release.set()
        for thread in (good, bad):
            thread.join(60)
        after = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 20}, timeout=30)
    assert list(batcher.joined) == [1]  # the bad one did join the good one's batch
    status, reply = outcomes["bad"]
    assert status == 500 and reply["error"]["type"] == "server_error" and "prefill failed" in reply["error"]["message"]
    status, reply = outcomes["good"]
    assert status == 200 and reply["usage"]["completion_tokens"] == 20
    assert reply["choices"][0]["text"] == after.json()["choices"][0]["text"]


def slowed(run, seconds=0.002):
    """The run with each forward pass of its model taking at least `seconds` more: 4,000 tokens take 8 s."""
    real = run.model.hidden_states

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    run.model.hidden_states = slow
    return run


def watched_app(run):
    """The app for `run` and the list of every job it is sent."""
    from gptlab.serve import create_app

    app = create_app(run, "tiny", GREEDY)
    batcher, jobs = app.state.batcher, []
    submit = batcher.submit

    def watched(batch):
        jobs.extend(batch)
        submit(batch)

    batcher.submit = watched
    return app, batcher, jobs


def leave_stream(url, body, events=3):
    """Stream `body`, read `events` events (none: only the headers), then disconnect."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        if events:
            for n, _ in enumerate(response.iter_lines()):
                if n >= 2 * events - 1:  # an event is its data line and a blank line
                    break


def test_clients_sharing_a_batch_with_one_that_leaves_still_get_their_whole_reply(tmp_path):
    run = make_run(tmp_path / "run")
    app, batcher, release = batched_app(run)
    body = {"prompt": "Hello", "max_tokens": 300}
    replies = {}

    def read_all(key, stream):
        response = httpx.post(f"{url}/v1/completions", json={**body, "stream": stream}, timeout=60)
        replies[key] = streamed_text(stream_events(response)) if stream else response.json()["choices"][0]["text"]

    with serving(app) as url:
        holder = threading.Thread(target=read_all, args=("held", False))
        holder.start()
        wait_for(lambda: list(batcher.batch_sizes) == [1])
        leaver = threading.Thread(target=leave_stream, args=(url, body, 2))
        others = [threading.Thread(target=read_all, args=(key, key == "stream")) for key in ("plain", "stream")]
        for thread in [leaver, *others]:
            thread.start()
        wait_for(lambda: len(batcher.waiting) == 3)
        release.set()
        for thread in [holder, leaver, *others]:
            thread.join(60)
    assert list(batcher.batch_sizes) == [1] and list(batcher.joined) == [3]  # all three joined the held one's batch
    assert replies["plain"] == replies["stream"] == replies["held"] and len(replies["plain"]) >= 150


def free_the_decoder(jobs):
    """After a test: let the decoder stop the rows nobody reads. A full collection closes a left client's
    piece generator (marking its job abandoned); a reader still blocked is sent the end of its row."""
    from gptlab.serve import _END

    deadline = time.monotonic() + 5
    while not all(job.abandoned for job in jobs) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    for job in jobs:
        if not job.abandoned:
            job.abandoned = True
            job.pieces.put(_END)


@pytest.fixture
def no_automatic_gc():
    """Cyclic garbage collection only when called: a server's full collections come rarely and at no set
    time, so whether a left client is noticed in time must not hang on one happening during the test."""
    gc.disable()
    yield
    gc.enable()


def answered_quickly(url, seconds=3):
    """Whether a small request sent now is answered within `seconds`, and how long it waited."""
    started = time.monotonic()
    try:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=seconds)
        return response.status_code == 200, time.monotonic() - started
    except httpx.ReadTimeout:
        return False, time.monotonic() - started


def test_a_client_that_leaves_its_stream_frees_the_decoder_for_the_others(tmp_path, no_automatic_gc):
    """A streaming client that disconnects is noticed when its response body ends, not when garbage collection
    closes its piece generators (a reference cycle keeps them until a full collection): otherwise the one
    decoder thread would decode its row to max_tokens, every other request waiting behind it."""
    app, batcher, jobs = watched_app(slowed(make_run(tmp_path / "run")))
    with serving(app) as url:
        try:
            leave_stream(url, {"prompt": "Hello", "max_tokens": 4000})
            assert len(jobs) == 1
            answered, waited = answered_quickly(url)
            left_marked = jobs[0].abandoned
        finally:
            free_the_decoder(jobs)
    assert answered, (
        f"a request sent after the only streaming client left waited {waited:.1f} s for the decoder, still "
        f"decoding the 4,000 tokens nobody reads (the left job is marked abandoned: {left_marked})"
    )


def test_a_client_that_leaves_before_its_stream_starts_is_not_decoded_for(tmp_path, no_automatic_gc):
    """A streaming client that leaves while its request waits for the decoder is not decoded for when its turn
    comes (ahead of the clients that are still there)."""
    from gptlab.serve import create_app

    run = slowed(make_run(tmp_path / "run"))
    app = create_app(run, "tiny", GREEDY)
    batcher, release = hold_first_batch(app)
    jobs, submit = [], batcher.submit
    batcher.submit = lambda batch: (jobs.extend(batch), submit(batch))
    with serving(app) as url:
        try:
            holder = threading.Thread(
                target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": {"prompt": "z"}, "timeout": 60}
            )
            holder.start()
            wait_for(lambda: list(batcher.batch_sizes) == [1])
            leave_stream(url, {"prompt": "Hello", "max_tokens": 4000}, events=0)  # the headers only, then gone
            release.set()
            holder.join(60)
            answered, waited = answered_quickly(url)
        finally:
            free_the_decoder(jobs)
    assert answered, f"a request sent after the streaming client left waited {waited:.1f} s behind its 4,000 tokens"
