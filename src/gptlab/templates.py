"""Named prompt formats for instruction-tuned models: one instruction, or a whole conversation, as text.

A run's config names its format under the key `template` (e.g. `template: alpaca`); plain pretrained
runs have none. Finetuning and chat use the same functions, so a model is prompted exactly the way it
was trained. A training example is `format_instruction(...)` followed by the response text.

Messages are dicts in the OpenAI style: {"role": "system" | "user" | "assistant", "content": str}.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gptlab.errors import GptlabError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Template:
    """How a system text, user turns and assistant replies are laid out as one string.

    `user` holds `{content}` and `{input}`; the optional input is first formatted with `input` (an
    absent input leaves `{input}` empty). A prompt for generation ends with `assistant`, the opener
    of the reply; a finished reply is followed by `reply_end`. `stop` holds the strings a model
    trained on the format writes when it starts a turn that is not its own.
    """

    name: str
    description: str
    default_system: str
    system: str
    user: str
    input: str
    assistant: str
    reply_end: str
    stop: tuple[str, ...]


ALPACA = Template(
    name="alpaca",
    description="Stanford Alpaca's format, as the book uses it: a preamble, then "
    "'### Instruction:', an optional '### Input:' and '### Response:' sections",
    default_system="Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    system="{system}\n\n",
    user="### Instruction:\n{content}\n\n{input}",
    input="### Input:\n{input}\n\n",
    assistant="### Response:\n",
    reply_end="\n\n",
    stop=("### Instruction:", "### Input:", "### Response:"),
)

CHAT = Template(
    name="chat",
    description="role markers on their own lines: <|system|>, <|user|> and <|assistant|>, each followed by its text",
    default_system="",
    system="<|system|>\n{system}\n",
    user="<|user|>\n{content}{input}\n",
    input="\n\n{input}",
    assistant="<|assistant|>\n",
    reply_end="\n",
    stop=("<|user|>", "<|system|>", "<|assistant|>"),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (ALPACA, CHAT)}


def get_template(name: str) -> Template:
    """The template called `name`; an unknown name is an error that lists the known ones."""
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GptlabError(f"unknown prompt template {name!r}{hint}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _resolve(template: str | Template) -> Template:
    return get_template(template) if isinstance(template, str) else template


def _user_turn(template: Template, content: str, input: str = "") -> str:
    return template.user.format(content=content, input=template.input.format(input=input) if input else "")


def _system_text(template: Template, system: str | None) -> str:
    text = template.default_system if system is None else system
    return template.system.format(system=text) if text else ""


def format_instruction(template: str | Template, instruction: str, input: str = "", system: str | None = None) -> str:
    """The prompt for one instruction (with an optional input), ending where the response begins."""
    template = _resolve(template)
    return _system_text(template, system) + _user_turn(template, instruction, input) + template.assistant


def format_messages(template: str | Template, messages: Sequence[Message]) -> str:
    """A conversation as text. When the last message is the user's, the text ends with the reply opener.

    A leading system message replaces the template's default system text.
    """
    template = _resolve(template)
    system = None
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts = [_system_text(template, system)]
    for message in messages:
        role, content = message.get("role"), message.get("content", "")
        if role == "user":
            parts.append(_user_turn(template, content) + template.assistant)
        elif role == "assistant":
            if not parts[-1].endswith(template.assistant):
                parts.append(template.assistant)
            parts.append(content + template.reply_end)
        else:
            where = "first" if role == "system" else "user or assistant"
            raise GptlabError(f"message role {role!r} is not allowed here; use {where} (roles: {', '.join(ROLES)})")
    return "".join(parts)


def fit_messages(
    template: str | Template, messages: Sequence[Message], count_tokens: Callable[[str], int], budget: int
) -> list[Message]:
    """Drop the oldest exchanges (keeping a system message and the last message) until the text fits `budget`.

    The result may still be too long when the last message alone is; the caller trims tokens then.
    """
    messages = list(messages)
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system) :]
    while len(turns) > 1 and count_tokens(format_messages(template, system + turns)) > budget:
        turns = turns[1:]
        while len(turns) > 1 and turns[0].get("role") != "user":
            turns = turns[1:]
    return system + turns
