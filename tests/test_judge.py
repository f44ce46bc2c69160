"""The judge client against a real OpenAI-compatible HTTP server on 127.0.0.1, started by the tests."""

import json
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptlab.errors import GptlabError
from gptlab.judge import (
    HISTOGRAM_FILE,
    SCORES_FILE,
    chat_completions_url,
    judge_entries,
    judge_run,
    parse_score,
    read_responses,
)

PROMPT = re.compile(r"correct output `(?P<reference>.*)`, score the model response `(?P<response>.*)` on a", re.DOTALL)


def fair_judge(body):
    """100 for a response equal to the reference, 25 for any other: read from the prompt the client sent."""
    found = PROMPT.search(body["messages"][-1]["content"])
    return 200, {"content": "100" if found["reference"] == found["response"] else "Score: 25"}


class ChatCompletionsHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions as OpenAI's API answers it; `server.answer(body)` picks the status and reply."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path != "/v1/chat/completions":
            status, payload = 404, {"error": {"message": f"no route {self.path}"}}
        else:
            status, answer = self.server.answer(body)
            payload = answer if status != 200 or "content" not in answer else self._completion(body, answer["content"])
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def _completion(body, content):
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }

    def log_message(self, *args):
        pass


@contextmanager
def judge_server(answer=fair_judge):
    """A chat completions server on a free port of 127.0.0.1; yields it (its `requests` and `url`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletionsHandler)
    server.answer, server.requests = answer, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


ENTRIES = [
    {"instruction": "Name a colour.", "input": "", "output": "Red.", "response": "Red."},
    {"instruction": "Spell it right.", "input": "freind", "output": "friend", "response": "frend"},
    {
        "messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
        "response": "Paris.",
    },
]


def test_judge_scores_each_response_against_its_reference():
    with judge_server() as server:
        result = judge_entries(ENTRIES, server.url, "judge-model")
    assert [e["score"] for e in result.entries] == [100, 25, 100]
    assert result.mean == pytest.approx(75.0)
    assert result.histogram()["90-100"] == 2 and result.histogram()["20-29"] == 1
    first, second, third = (r["body"] for r in server.requests)
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] is None for r in server.requests)
    assert first["model"] == "judge-model" and first["temperature"] == 0
    asked = second["messages"][0]["content"]
    assert "Spell it right." in asked and "freind" in asked and "`friend`" in asked and "`frend`" in asked
    assert "user: Capital of France?" in third["messages"][0]["content"]


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/chat/completions"])
def test_endpoint_may_be_the_server_the_api_base_or_the_full_url(suffix):
    with judge_server() as server:
        result = judge_entries(ENTRIES[:1], server.url + suffix, "m")
    assert result.scores == [100] and server.requests[0]["path"] == "/v1/chat/completions"


def test_api_key_is_sent_as_a_bearer_token():
    with judge_server() as server:
        judge_entries(ENTRIES[:1], server.url, "m", api_key="sk-test")
    assert server.requests[0]["auth"] == "Bearer sk-test"


@pytest.mark.parametrize(
    "reply, score",
    [("85", 85), ("Score: 85/100", 85), ("<think>maybe 3 or 4</think>\n90", 90), ("72.5", 72.5),
     ("I cannot score this.", None), ("150", None), ("-5", None), ("Score: \u22125", None), ("100.", 100),
     ("score: 7.5", 7.5), (".5", 0.5), ("GPT4 would give 80", 80), ("Rated 85-90", 85),
     ("<think>it could be 3 or", None), ("first 3, no: </think> 90", 90)],
)  # fmt: skip
def test_parse_score_reads_the_first_number_in_range(reply, score):
    assert parse_score(reply) == score


def test_unreadable_replies_are_counted_and_no_score_at_all_is_an_error():
    replies = iter(["90", "no idea"])
    with judge_server(lambda body: (200, {"content": next(replies)})) as server:
        result = judge_entries(ENTRIES[:2], server.url, "m")
    assert result.scores == [90] and result.unscored == 1
    with judge_server(lambda body: (200, {"content": "I refuse."})) as server:
        with pytest.raises(GptlabError, match="gave no score from 0 to 100 in 3 replies"):
            judge_entries(ENTRIES, server.url, "m")


def test_a_busy_server_is_asked_again():
    statuses = iter([503, 429, 200])
    with judge_server(lambda body: (status := next(statuses), {"content": "80"} if status == 200 else {})) as server:
        result = judge_entries(ENTRIES[:1], server.url, "m", retry_delay=0)
    assert result.scores == [80] and len(server.requests) == 3


@pytest.mark.parametrize(
    "answer, message",
    [
        (lambda body: (404, {"error": {"message": "model 'x' not found"}}), "answered HTTP 404: .*model 'x' not found"),
        (lambda body: (500, {"error": "boom"}), "answered HTTP 500"),
        (lambda body: (200, {"unexpected": True}), "did not answer an OpenAI chat completion"),
    ],
)
def test_server_failures_are_one_line_errors(answer, message):
    with judge_server(answer) as server:
        with pytest.raises(GptlabError, match=message) as info:
            judge_entries(ENTRIES[:1], server.url, "m", retry_delay=0)
    assert "\n" not in str(info.value)


def test_an_unreachable_endpoint_is_a_one_line_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(GptlabError, match="could not reach the judge .* is the server running"):
        judge_entries(ENTRIES[:1], f"http://127.0.0.1:{port}", "m")
    with pytest.raises(GptlabError, match="must be an http"):
        chat_completions_url("127.0.0.1:11434")


def test_judge_run_writes_scores_and_a_histogram_beside_the_responses(tmp_path):
    (tmp_path / "test_responses.json").write_text(json.dumps(ENTRIES))
    with judge_server() as server:
        result, scores_file, histogram_file = judge_run(tmp_path, server.url, "judge-model", limit=2)
    saved = json.loads(scores_file.read_text())
    assert scores_file == tmp_path / SCORES_FILE and histogram_file == tmp_path / HISTOGRAM_FILE
    assert saved["mean"] == pytest.approx(62.5) and saved["count"] == 2 and saved["model"] == "judge-model"
    assert [e["score"] for e in saved["entries"]] == [100, 25] and saved["entries"][1]["judge_reply"] == "Score: 25"
    assert histogram_file.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), ("[]", "non-empty JSON list"), ('[{"instruction": "a", "output": "b"}]', "entry 0 of")],
)
def test_bad_responses_files_are_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "test_responses.json").write_text(content)
    with pytest.raises(GptlabError, match=message):
        read_responses(tmp_path)


def test_the_client_speaks_to_gptlab_serve(tmp_path):
    """gptlab's own OpenAI-compatible server as the judge: a tiny random model, so any reply will do."""
    pytest.importorskip("uvicorn")
    from gptlab.config import GenerationConfig
    from gptlab.judge import ask, judge_prompt
    from gptlab.serve import create_app
    from test_serve import make_run, serving

    app = create_app(make_run(tmp_path / "run", template="chat"), "tiny", GenerationConfig(max_new_tokens=4))
    with serving(app) as url:
        reply = ask(chat_completions_url(f"{url}/v1"), "tiny", judge_prompt(ENTRIES[0]))
    assert isinstance(reply, str)  # ask() raises unless the answer is a well-formed chat completion
