import json

import pytest
import torch

from gptlab.checkpoint import (
    WEIGHTS_FILE,
    find_checkpoint,
    load_run,
    load_weights,
    read_run_config,
    save_checkpoint,
    write_run_config,
)
from gptlab.config import GPTConfig, InstructConfig, LoRAConfig, config_to_dict
from gptlab.errors import GptlabError
from gptlab.instruct import (
    IGNORE_INDEX,
    RESPONSES_FILE,
    SPLIT_DIR,
    Example,
    ExampleBatches,
    collate,
    encode_example,
    finetune_instruct,
    has_response,
    load_records,
    prompt_and_reference,
    record_segments,
    split_records,
)
from gptlab.lora import expected_lora_parameters
from gptlab.model import GPT
from gptlab.templates import ALPACA, CHAT, format_messages
from gptlab.tokenizer import ByteTokenizer

CONFIG = GPTConfig(vocab_size=257, context_length=64, n_layer=2, n_head=2, n_embd=32)
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def word_records(repeat=3):
    """Records the tiny model learns in a few steps: say the input word twice."""
    return [{"instruction": "Twice.", "input": w, "output": f"{w} {w}"} for w in WORDS * repeat]


def base_run(tmp_path):
    """A tiny 'pretrained' run (random weights, byte tokenizer) to finetune from."""
    torch.manual_seed(0)
    run = tmp_path / "base"
    write_run_config(run, {"task": "pretrain", "model": config_to_dict(CONFIG)})
    ByteTokenizer().save(run / "tokenizer")
    return save_checkpoint(run, 10, GPT(CONFIG).state_dict(), {"step": 10})


def run_values(tmp_path, records=None, **sections):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records if records is not None else word_records()))
    train = dict(max_steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=2, eval_interval=6, log_interval=6,
                 eval_batches=4, peak_flops=1e11, sample_tokens=8, threads=1, seed=0)  # fmt: skip
    return {
        "init_from": str(base_run(tmp_path)),
        "out_dir": str(tmp_path / "run"),
        "template": "chat",
        "instruct": {"source": str(data), "response_tokens": 12, **sections.pop("instruct", {})},
        "train": {**train, **sections.pop("train", {})},
        **sections,
    }


# ---------------------------------------------------------------- records, templates, tokens


def test_alpaca_record_is_the_book_prompt_then_the_output():
    record = {"instruction": "Name a colour.", "input": "", "output": "Red."}
    (prompt, is_prompt_response), (output, is_response) = record_segments(record, ALPACA)
    assert prompt.startswith("Below is an instruction that describes a task.")
    assert prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input" not in prompt
    assert (output, is_prompt_response, is_response) == ("Red.", False, True)
    with_input = record_segments({**record, "input": "sky"}, ALPACA)[0][0]
    assert "### Input:\nsky\n\n### Response:\n" in with_input


def test_chat_record_trains_on_every_assistant_reply():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    segments = record_segments({"messages": messages}, CHAT)
    assert [is_response for _, is_response in segments] == [False, True, False, True]
    assert segments[1][0] == "Hello." + CHAT.reply_end  # an earlier reply keeps its end; the last ends at EOT
    assert segments[3][0] == "Goodbye."
    assert "".join(text for text, _ in segments) + CHAT.reply_end == format_messages(CHAT, messages)
    prompt, reference = prompt_and_reference({"messages": messages}, CHAT)
    assert prompt == format_messages(CHAT, messages[:-1]) and reference == "Goodbye."


def test_example_ends_with_end_of_text_and_marks_the_response():
    tokenizer = ByteTokenizer()
    example = encode_example({"instruction": "a", "output": "xy"}, CHAT, tokenizer, max_length=64)
    prompt = CHAT.user.format(content="a", input="") + CHAT.assistant
    assert example.ids == list(prompt.encode()) + [ord("x"), ord("y"), tokenizer.eot_id]
    assert example.response == [False] * len(prompt) + [True] * 3
    cut = encode_example({"instruction": "a", "output": "xy"}, CHAT, tokenizer, max_length=5)
    assert len(cut.ids) == 6 and tokenizer.eot_id not in cut.ids


def test_collate_pads_with_end_of_text_and_ignores_prompt_and_padding():
    eot = 9
    short = Example(ids=[1, 2, 3, eot], response=[False, False, True, True])
    long = Example(ids=[1, 2, 4, 5, 6, eot], response=[False, False, True, True, True, True])
    batch = collate([short, long], eot)
    assert batch["input"].tolist() == [[1, 2, 3, eot, eot], [1, 2, 4, 5, 6]]
    assert batch["target"].tolist() == [[-100, 3, eot, -100, -100], [-100, 4, 5, 6, eot]]
    unmasked = collate([short, long], eot, mask_prompt=False)
    assert unmasked["target"].tolist() == [[2, 3, eot, -100, -100], [2, 4, 5, 6, eot]]
    assert IGNORE_INDEX == -100


def test_masked_loss_counts_only_response_tokens():
    tokenizer = ByteTokenizer()
    model = GPT(CONFIG).eval()
    examples = [encode_example(r, CHAT, tokenizer, 64) for r in word_records(1)[:3]]
    batch = collate(examples, tokenizer.eot_id)
    with torch.no_grad():
        logits = model(batch["input"])
    keep = batch["target"] != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], batch["target"][keep])
    assert keep.sum() == sum(sum(e.response[1:]) for e in examples)
    with torch.no_grad():
        assert model(batch["input"], batch["target"]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_split_is_seeded_disjoint_and_85_5_10():
    records = [{"instruction": str(i), "output": str(i)} for i in range(100)]
    split = split_records(records, [0.85, 0.05, 0.10], seed=1)
    assert [len(split[name]) for name in ("train", "validation", "test")] == [85, 5, 10]
    seen = [r["instruction"] for part in split.values() for r in part]
    assert sorted(seen, key=int) == [str(i) for i in range(100)]
    assert split == split_records(records, [0.85, 0.05, 0.10], seed=1)
    assert split["test"] != split_records(records, [0.85, 0.05, 0.10], seed=2)["test"]


def test_batches_cover_each_epoch_once_and_resume_exactly():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53, 9, 54, 10]
    batches = ExampleBatches(lengths, batch_size=2, seed=3)
    first_epoch = [batches.next_indices() for _ in range(5)]
    assert len({i for b in first_epoch for i in b}) == 10  # five full batches; one example waits
    state = batches.state_dict()
    ahead = [batches.next_indices() for _ in range(7)]
    resumed = ExampleBatches(lengths, batch_size=2, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(7)] == ahead


def test_ranks_take_disjoint_batches_that_together_are_the_epoch():
    lengths = list(range(5, 25))  # 20 examples: 5 batches of 4, so 2 groups of 2 ranks and one batch left over
    ranks = [ExampleBatches(lengths, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    epoch = ExampleBatches(lengths, batch_size=4, seed=1).epoch_batches(0)
    steps = [[r.next_indices() for r in ranks] for _ in range(2)]
    assert [batch for step in steps for batch in step] == [b.tolist() for b in epoch[:4]]
    # The fifth batch has no partner: both ranks go on with the next epoch's first two batches.
    assert [r.next_indices() for r in ranks] == [b.tolist() for b in ranks[0].epoch_batches(1)[:2]]
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"seed": 1, "epoch": 1, "position": 2}
    with pytest.raises(GptlabError, match="fewer than one batch of 4 for each of 8 ranks"):
        ExampleBatches(lengths, batch_size=4, seed=1, world_size=8)


def test_bucketing_batches_examples_of_similar_length():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53, 9, 54]
    plain = ExampleBatches(lengths, batch_size=5, seed=0).epoch_batches(0)
    bucketed = ExampleBatches(lengths, batch_size=5, seed=0, bucketing=True).epoch_batches(0)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bucketed]
    assert max(spread) == 4
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) > 4


# ---------------------------------------------------------------- bad input: one-line errors


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "holds no records"),
        ("", "holds no records"),
        ('{"instruction": "a"}', "must hold a JSON list"),
        ('[{"instruction": "a"}]', "record 0 of"),
        ('[{"output": "a"}]', "lacks 'instruction'"),
        ('[{"instruction": "a", "output": 3}]', "'output' must be a string, got int"),
        ('[{"instruction": ["a"], "output": "b"}]', "'instruction' must be a string, got list"),
        ('[{"instruction": "a", "input": null, "output": "b"}]', "'input' must be a string"),
        ("[1]", "must be a JSON object, got int"),
        ('[{"messages": []}]', "non-empty list"),
        ('[{"messages": [{"role": "bot", "content": "x"}]}]', "needs a 'role' among"),
        ('[{"messages": [{"role": "user", "content": "x"}]}]', "last message must be the assistant"),
        ("[{", "is not valid JSON"),
    ],
)
def test_bad_records_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(GptlabError, match=message) as info:
        load_records(str(path))
    assert "\n" not in str(info.value)


def test_json_lines_are_read_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"messages": [{"role": "user", "content": "x"}, '
                    '{"role": "assistant", "content": "y"}]}\n')  # fmt: skip
    assert len(load_records(str(path))) == 2
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(GptlabError, match="line 2 is not valid JSON"):
        load_records(str(path))


def test_unknown_sources_are_errors(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        load_records(str(tmp_path / "missing.json"))
    with pytest.raises(GptlabError, match="did you mean 'instruction-data'"):
        load_records("instruction-dta")


def test_named_data_set_loads(shared_data):
    records = load_records("instruction-data")
    assert len(records) == 1100 and {"instruction", "input", "output"} <= set(records[0])


def test_bad_config_values_are_errors():
    with pytest.raises(GptlabError, match="three fractions"):
        InstructConfig(split=[0.9, 0.1])
    with pytest.raises(GptlabError, match="did you mean 'lora'"):
        InstructConfig(trainable="lor")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"template": "alpacca"}, "unknown prompt template 'alpacca' \\(did you mean 'alpaca'\\?\\)"),
        ({"instruct": {"trainable": "lora"}, "lora": {"targets": ["attn.qkvv"]}}, "LoRA target 'attn.qkvv' matches no"),
        ({"instruct": {"max_length": 65}}, "exceeds the model's context length 64"),
        ({"init_from": None}, "pass --init-from"),
    ],
)
def test_bad_runs_fail_before_writing_anything(tmp_path, overrides, message):
    values = {**run_values(tmp_path), **overrides}
    with pytest.raises(GptlabError, match=message):
        finetune_instruct(values)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_records_whose_response_is_cut_off_are_left_out():
    record = word_records()[0]
    prompt_tokens = len(ByteTokenizer().encode(prompt_and_reference(record, CHAT)[0]))
    assert has_response(encode_example(record, CHAT, ByteTokenizer(), prompt_tokens))
    assert not has_response(encode_example(record, CHAT, ByteTokenizer(), prompt_tokens - 1))


def test_without_prompt_masking_a_record_cut_before_its_response_still_trains():
    from gptlab.instruct import _answered_example

    record = word_records()[0]
    cut = len(ByteTokenizer().encode(prompt_and_reference(record, CHAT)[0])) - 1
    assert _answered_example(record, CHAT, ByteTokenizer(), cut) is None  # only the response is a target
    assert _answered_example(record, CHAT, ByteTokenizer(), cut, mask_prompt=False) is not None  # every token is


def test_a_run_whose_every_response_is_cut_off_is_refused_before_writing(tmp_path):
    with pytest.raises(GptlabError, match="no training or validation record keeps a response token within 3 tokens"):
        finetune_instruct(run_values(tmp_path, instruct={"max_length": 3}))
    assert not (tmp_path / "run").exists()


def test_an_overwrite_that_fails_leaves_the_run_it_would_replace_intact(tmp_path):
    values = run_values(tmp_path, train={"max_steps": 2, "eval_interval": 2})
    finetune_instruct(values)
    run = tmp_path / "run"
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    with pytest.raises(GptlabError, match="response token"):
        finetune_instruct({**values, "instruct": {**values["instruct"], "max_length": 3}}, overwrite=True)
    with pytest.raises(GptlabError, match="smaller than one batch"):  # checked by the training loop itself
        finetune_instruct({**values, "train": {**values["train"], "tokens_per_step": 1}}, overwrite=True)
    assert {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()} == before


def test_too_few_records_for_the_split_is_an_error(tmp_path):
    with pytest.raises(GptlabError, match="leave the validation split empty"):
        finetune_instruct(run_values(tmp_path, records=word_records(1)[:4]))


# ---------------------------------------------------------------- runs


def test_finetuning_lowers_the_response_loss_and_writes_the_run(tmp_path):
    result = finetune_instruct(run_values(tmp_path))
    run = tmp_path / "run"
    assert result.final_eval["val_loss"] < 0.8 * result.start_eval["val_loss"]
    config = read_run_config(run)
    assert config["template"] == "chat" and config["task"] == "instruct" and "lora" not in config
    split = {
        name: json.loads((run / SPLIT_DIR / f"{name}.json").read_text()) for name in ("train", "validation", "test")
    }
    assert [len(part) for part in split.values()] == [25, 2, 3]
    responses = json.loads((run / RESPONSES_FILE).read_text())
    assert [r["input"] for r in responses] == [r["input"] for r in split["test"]]
    assert all(isinstance(r["response"], str) and r["finish"] in ("end_of_text", "stop_string", "length")
               for r in responses)  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0] == {"step": 0, "split": "val", "tokens": 0, **result.start_eval}


def test_lora_run_trains_and_saves_only_the_adapters(tmp_path):
    values = run_values(tmp_path, instruct={"trainable": "lora"}, lora={"rank": 2})
    result = finetune_instruct(values)
    assert result.trainable_parameters == expected_lora_parameters(CONFIG, LoRAConfig(rank=2))
    assert result.final_eval["val_loss"] < result.start_eval["val_loss"]
    weights = load_weights(find_checkpoint(tmp_path / "run") / WEIGHTS_FILE)
    assert weights and all(name.endswith((".lora_A", ".lora_B")) for name in weights)
    config = read_run_config(tmp_path / "run")
    assert config["lora"]["rank"] == 2 and config["init_from"].endswith("step-0000010")
    loaded = load_run(tmp_path / "run")
    base = load_run(tmp_path / "base")
    idx = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(loaded.model(idx), base.model(idx))


def test_lora_run_resumed_from_a_checkpoint_ends_exactly_as_one_straight_run(tmp_path):
    import shutil

    values = run_values(tmp_path, instruct={"trainable": "lora"}, train={"max_steps": 6, "eval_interval": 3})
    finetune_instruct(values)
    run, copy = tmp_path / "run", tmp_path / "halted"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000006")
    (copy / "latest").write_text("step-0000003\n")  # as if killed after the checkpoint at step 3
    finetune_instruct({**read_run_config(copy), "out_dir": str(copy)}, resume=True)
    straight = load_weights(find_checkpoint(run) / WEIGHTS_FILE)
    resumed = load_weights(find_checkpoint(copy) / WEIGHTS_FILE)
    assert find_checkpoint(copy).name == "step-0000006"
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_target_share_counts_the_input_positions_that_reach_the_head():
    from gptlab.instruct import Example, target_share

    examples = [Example([1, 2, 3, 4], [False, False, True, True]), Example([5, 6, 7], [False, True, True])]
    assert target_share(examples) == pytest.approx(4 / 5)  # inputs 3 + 2; targets 2 + 2 (the first id is none)
    assert target_share(examples, mask_prompt=False) == 1.0


def test_given_sample_prompts_are_answered_as_instructions_in_the_template(tmp_path, monkeypatch):
    import gptlab.instruct as instruct
    from gptlab.templates import format_instruction

    asked, answer = [], instruct.generate_responses

    def spy(model, tokenizer, prompts, *args, **kwargs):
        asked.append(list(prompts))
        return answer(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(instruct, "generate_responses", spy)
    values = run_values(tmp_path)
    values["train"].update(max_steps=2, eval_interval=2, sample_prompts=["Name a colour."])
    finetune_instruct(values)
    assert asked[0] == [format_instruction(values["template"], "Name a colour.")]  # the first evaluation's samples
