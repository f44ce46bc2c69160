import pytest

from gptlab.errors import GptlabError
from gptlab.templates import fit_messages, format_instruction, format_messages, get_template

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_alpaca_instruction_matches_the_books_format():
    expected = f"{PREAMBLE}\n\n### Instruction:\nName a color.\n\n### Response:\n"
    assert format_instruction("alpaca", "Name a color.") == expected


def test_alpaca_input_gets_its_own_section():
    expected = f"{PREAMBLE}\n\n### Instruction:\nTranslate.\n\n### Input:\nhola\n\n### Response:\n"
    assert format_instruction("alpaca", "Translate.", "hola") == expected


def test_one_user_message_formats_like_one_instruction():
    for name in ("alpaca", "chat"):
        assert format_messages(name, [{"role": "user", "content": "Hi"}]) == format_instruction(name, "Hi")


def test_chat_template_marks_every_role():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n<|user|>\nBye\n<|assistant|>\n"
    assert format_messages("chat", messages) == expected


def test_alpaca_history_repeats_sections_under_one_preamble():
    messages = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "B"},
    ]
    text = format_messages("alpaca", messages)
    assert text == f"{PREAMBLE}\n\n### Instruction:\nA\n\n### Response:\n1\n\n### Instruction:\nB\n\n### Response:\n"
    assert text.count(PREAMBLE) == 1


def test_system_message_replaces_the_default_system_text():
    text = format_messages(
        "alpaca", [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    )
    assert text.startswith("Answer in French.\n\n### Instruction:") and PREAMBLE not in text


def test_fit_messages_drops_the_oldest_exchanges_first():
    messages = [{"role": "system", "content": "S"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last"})
    full = len(format_messages("chat", messages))
    fitted = fit_messages("chat", messages, len, full - 20)
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]
    assert fitted[1] == {"role": "user", "content": "question 1"}
    assert len(format_messages("chat", fitted)) <= full - 20
    assert fit_messages("chat", messages, len, 1) == [messages[0], messages[-1]]


def test_unknown_template_suggests_a_name():
    with pytest.raises(GptlabError, match="did you mean 'alpaca'"):
        get_template("alpacca")


def test_misplaced_role_is_a_clear_error():
    with pytest.raises(GptlabError, match="role 'system' is not allowed"):
        format_messages("chat", [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(GptlabError, match="role 'tool'"):
        format_messages("chat", [{"role": "tool", "content": "b"}])
