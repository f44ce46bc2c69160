"""Scoring a model's responses with a judge model behind any OpenAI-compatible chat endpoint (a local
Ollama or llama.cpp server, vLLM, a hosted API): each instruction, its reference answer and the model's
response go to the judge, which answers a score from 0 to 100.

Plain urllib: no client library, and the judge's requests are exactly what the protocol documents
(POST {base}/chat/completions with a model and messages; the answer is choices[0].message.content).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

SCORES_FILE = "judge_scores.json"
HISTOGRAM_FILE = "judge_scores.png"
RESPONSES_FILE = "test_responses.json"  # what `gptlab finetune instruct` writes (gptlab.instruct)

# The book's judging prompt (chapter 7), with the task, the reference and the response filled in.
JUDGE_PROMPT = (
    "Given the input `{task}` and correct output `{reference}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Reasoning: a <think> block (one left open runs to the end: the reply was cut off while thinking), or
# everything up to a lone </think> (some servers put the opening tag in the prompt).
_THINKING = re.compile(r"<think>.*?(?:</think>|\Z)|\A(?:(?!<think>).)*?</think>", re.DOTALL)
# A number, with its sign (so -5 is not read as 5), not the digits inside a word ("GPT4") or after a point.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d+(?:\.\d+)?|\.\d+)")


def chat_completions_url(endpoint: str) -> str:
    """The chat completions URL of an endpoint given as a server (http://host:port), its API base
    (http://host:port/v1) or the full URL."""
    url = endpoint.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise GptlabError(
            f"judge endpoint {endpoint!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:11434"
        )
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def task_and_reference(entry: dict[str, Any]) -> tuple[str, str]:
    """The task as the judge reads it and its reference answer, from an Alpaca-style or chat record."""
    if "messages" in entry:
        *asked, answer = entry["messages"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in asked), answer["content"]
    task = entry["instruction"] + (f"\n\nInput: {entry['input']}" if entry.get("input") else "")
    return task, entry["output"]


def judge_prompt(entry: dict[str, Any]) -> str:
    task, reference = task_and_reference(entry)
    return JUDGE_PROMPT.format(task=task, reference=reference, response=entry["response"])


def parse_score(reply: str) -> float | None:
    """The first number of the judge's reply (after any <think> block) when it lies in 0-100, else None:
    a reply of "-5" or "150" is unscored."""
    found = _NUMBER.search(_THINKING.sub("", reply))
    if found is None:
        return None
    score = float(found.group().replace("\u2212", "-"))
    return score if 0 <= score <= 100 else None


def ask(
    url: str,
    model: str,
    prompt: str,
    api_key: str | None = None,
    timeout: float = 120.0,
    attempts: int = 3,
    retry_delay: float = 1.0,
) -> str:
    """The judge's reply to one user message; busy or failing servers (429, 5xx, timeouts) are retried."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = response.read()
            break
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace").strip().replace("\n", " ")[:200]
            if exc.code not in RETRY_STATUSES or attempt == attempts:
                raise GptlabError(f"the judge at {url} answered HTTP {exc.code}: {detail or exc.reason}") from None
        except OSError as exc:  # URLError wraps refused connections; timeouts and resets may come bare
            reason = getattr(exc, "reason", exc)
            if attempt == attempts or not isinstance(reason, (TimeoutError, ConnectionResetError)):
                raise GptlabError(f"could not reach the judge at {url} ({reason}); is the server running?") from None
        time.sleep(retry_delay * attempt)
    try:
        return json.loads(answer)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise GptlabError(f"the judge at {url} did not answer an OpenAI chat completion: {answer[:200]!r}") from None


@dataclass
class JudgeResult:
    """Scores of a set of responses: one entry per response (with `score`, None when unreadable)."""

    entries: list[dict[str, Any]]
    model: str
    endpoint: str

    @property
    def scores(self) -> list[float]:
        return [e["score"] for e in self.entries if e["score"] is not None]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else math.nan

    @property
    def unscored(self) -> int:
        return len(self.entries) - len(self.scores)

    def histogram(self) -> dict[str, int]:
        """Counts of scores in bins of ten: 0-9, 10-19, ..., 90-100."""
        counts = [0] * 10
        for score in self.scores:
            counts[min(int(score // 10), 9)] += 1
        return {f"{10 * i}-{10 * i + 9 if i < 9 else 100}": n for i, n in enumerate(counts)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "endpoint": self.endpoint, "mean": self.mean, "count": len(self.scores),
            "unscored": self.unscored, "histogram": self.histogram(), "entries": self.entries,
        }  # fmt: skip


def judge_entries(
    entries: Sequence[dict[str, Any]],
    endpoint: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 120.0,
    retry_delay: float = 1.0,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> JudgeResult:
    """Ask the judge to score every entry (a record with the model's `response`)."""
    url = chat_completions_url(endpoint)
    scored = []
    for i, entry in enumerate(entries):
        reply = ask(url, model, judge_prompt(entry), api_key, timeout, retry_delay=retry_delay)
        scored.append({**entry, "score": parse_score(reply), "judge_reply": reply})
        progress(i + 1, len(entries))
    result = JudgeResult(scored, model, endpoint)
    if entries and not result.scores:
        raise GptlabError(
            f"the judge {model!r} gave no score from 0 to 100 in {len(entries)} replies "
            f"(first: {scored[0]['judge_reply'][:80]!r}); choose a model that follows the prompt"
        )
    return result


def read_responses(path: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """The entries of a responses file, or of a run's `test_responses.json`; and the folder they are in."""
    path = Path(path)
    file = path / RESPONSES_FILE if path.is_dir() else path
    if not file.is_file():
        raise GptlabError(f"{file} not found; finetune with `gptlab finetune instruct` to write the test responses")
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise GptlabError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise GptlabError(f"{file} must hold a non-empty JSON list of records with a 'response'")
    for i, entry in enumerate(entries):
        try:
            task_and_reference(entry)
            if not isinstance(entry["response"], str):
                raise TypeError
        except (KeyError, TypeError, IndexError, ValueError):
            raise GptlabError(
                f"entry {i} of {file} needs 'instruction', 'output' and 'response' (or 'messages' and 'response')"
            ) from None
    return entries, file.parent


def plot_histogram(result: JudgeResult, path: Path) -> None:
    """The scores as a histogram PNG with bins of ten."""
    from gptlab.train import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=100)
    ax.hist(result.scores, bins=range(0, 101, 10), color="tab:blue", edgecolor="white")
    ax.axvline(result.mean, color="tab:orange", label=f"mean {result.mean:.1f}")
    ax.set_xlim(0, 100)
    ax.set_xlabel("judge score")
    ax.set_ylabel("responses")
    ax.set_title(f"{len(result.scores)} responses judged by {result.model}")
    ax.legend()
    save_figure(fig, path)


def judge_run(
    path: str | Path,
    endpoint: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 120.0,
    limit: int | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[JudgeResult, Path, Path]:
    """Judge a run's test responses; write the scores (JSON) and their histogram (PNG) beside them."""
    from gptlab.checkpoint import atomic_write_text

    entries, folder = read_responses(path)
    result = judge_entries(entries[:limit], endpoint, model, api_key, timeout, progress=progress)
    scores_file, histogram_file = folder / SCORES_FILE, folder / HISTOGRAM_FILE
    atomic_write_text(scores_file, json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    plot_histogram(result, histogram_file)
    return result, scores_file, histogram_file
