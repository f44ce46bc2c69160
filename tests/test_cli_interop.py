"""`gptlab import` and `gptlab export` end to end, through gptlab.cli.main."""

import io
import json

import pytest
import torch

from gptlab.checkpoint import load_run, read_run_config
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.tokenizer import ByteTokenizer, GPT2Tokenizer
from test_cli_generate import TINY
from test_cli_generate import make_run as make_byte_run
from test_interop import GPT2_VOCAB, hub, make_run, save_hf_gpt2  # noqa: F401 (hub: a fixture)

transformers = pytest.importorskip("transformers")


def test_imported_model_generates_what_transformers_generates_and_exports_back(tmp_path, shared_data, capsys):
    hf = save_hf_gpt2(tmp_path / "hf")
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(run)]) == 0
    assert f"into {run}" in capsys.readouterr().out

    greedy = ["--greedy", "--max-new-tokens", "10", "--stop-at-eot", "false", "--device", "cpu"]
    assert main(["generate", str(run), "Hello there", "--json", *greedy]) == 0
    completion = json.loads(capsys.readouterr().out)["completions"][0]
    tokenizer = GPT2Tokenizer()
    prompt = tokenizer.encode("Hello there")
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert completion == tokenizer.decode(ids[0, len(prompt) :].tolist())

    assert main(["export", str(run), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, hf(idx).logits)
    assert transformers.AutoTokenizer.from_pretrained(out)("Hello there")["input_ids"] == prompt


def test_imported_model_chats(tmp_path, shared_data, capsys, monkeypatch):
    save_hf_gpt2(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "4", "--seed", "1", "--device", "cpu"]) == 0


def test_imported_model_is_served_and_finetuned(tmp_path, shared_data, capsys):
    from fastapi.testclient import TestClient

    from gptlab.config import GenerationConfig
    from gptlab.generate import generate
    from gptlab.serve import create_app

    save_hf_gpt2(tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(run)]) == 0
    loaded = load_run(run)
    greedy = GenerationConfig(max_new_tokens=5, temperature=0.0)
    client = TestClient(create_app(loaded, "gpt2", greedy))
    reply = client.post("/v1/completions", json={"model": "gpt2", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"] == generate(loaded.model, loaded.tokenizer, "Hello", greedy)[0]

    records = [{"instruction": "Repeat.", "input": w, "output": w} for w in ["red", "blue", "green", "cat"] * 5]
    (tmp_path / "data.json").write_text(json.dumps(records))
    tiny = ["--train.max_steps", "2", "--train.batch_size", "2", "--train.eval_interval", "2", "--train.eval_batches", "1",
            "--train.peak_flops", "1e11", "--train.sample_tokens", "2", "--instruct.response_tokens", "2"]  # fmt: skip
    argv = ["finetune", "instruct", "--init-from", str(run), "--out", str(tmp_path / "tuned")]
    assert main([*argv, "--instruct.source", str(tmp_path / "data.json"), *tiny]) == 0
    assert load_run(tmp_path / "tuned").config["init_from"]


def test_imported_model_finetunes_into_a_classifier_that_exports(tmp_path, shared_data, capsys):
    save_hf_gpt2(tmp_path / "hf")
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(run)]) == 0
    rows = [f"{label}\t{text}" for label, text in [("ham", "see you soon"), ("spam", "WIN CASH NOW")] * 10]
    (tmp_path / "data.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n")
    tiny = ["--train.max_steps", "2", "--train.batch_size", "2", "--train.eval_interval", "2", "--train.eval_batches", "1",
            "--train.peak_flops", "1e11"]  # fmt: skip
    argv = ["finetune", "classify", "--init-from", str(run), "--out", str(tuned), "--classify.source"]
    assert main([*argv, str(tmp_path / "data.tsv"), *tiny]) == 0
    assert main(["export", str(tuned), str(tmp_path / "exported")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    classifier = load_run(tuned)
    assert list(hf.config.id2label.values()) == classifier.config["classify"]["labels"]
    ids = torch.tensor([GPT2Tokenizer().encode("WIN CASH")])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, classifier.model(ids), atol=1e-5)


@pytest.mark.usefixtures("hub")
def test_import_gpt2_from_a_local_hub(tmp_path, shared_data):
    run = tmp_path / "run"
    assert main(["import", "gpt2", "--size", "gpt2", "--out", str(run), "--dropout", "0.05"]) == 0
    assert read_run_config(run)["model"]["dropout"] == 0.05  # the served config.json says 0.0
    assert load_run(run).model.config.dropout == 0.05


def test_a_directory_that_is_not_gpt2_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["import", "hf", str(tmp_path / "llama"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'llama' model" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_export_refuses_to_replace_a_directory_unless_forced(tmp_path, shared_data, capsys):
    save_hf_gpt2(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--force"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["gptlab"]["tokenizer"] == "gpt2"


def test_export_into_the_folder_of_its_runs_is_a_one_line_error_that_deletes_nothing(tmp_path, capsys):
    config = GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=1, n_embd=8)
    for name in ("shk", "spam"):
        make_run(tmp_path / "runs" / name, config, ByteTokenizer())
    assert main(["export", str(tmp_path / "runs" / "shk"), str(tmp_path / "runs"), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is or holds" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["shk", "spam"]
    assert all(load_run(tmp_path / "runs" / name).model.config == config for name in ("shk", "spam"))


def test_import_and_export_suggest_what_fits_a_classifier(tmp_path, capsys):
    from dataclasses import asdict

    from gptlab.checkpoint import save_checkpoint, write_run_config
    from gptlab.classify import GPTClassifier

    run, exported, back = tmp_path / "run", tmp_path / "hf", tmp_path / "back"
    write_run_config(run, {"task": "classify", "model": asdict(TINY), "classify": {"labels": ["ham", "spam"]}})
    ByteTokenizer().save(run / "tokenizer")
    save_checkpoint(run, 0, GPTClassifier(TINY, 2).state_dict(), {})
    assert main(["export", str(run), str(exported)]) == 0
    out = capsys.readouterr().out
    assert "GPT2ForSequenceClassification" in out and "AutoModelForSequenceClassification" in out
    assert "AutoModelForCausalLM" not in out
    assert main(["import", "hf", str(exported), "--out", str(back)]) == 0
    out = capsys.readouterr().out
    assert f"try: gptlab classify {back}" in out and "generate" not in out


def test_import_and_export_suggest_generate_for_a_language_model(tmp_path, capsys):
    run_dir = make_byte_run(tmp_path / "run")
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert f"try: gptlab generate {tmp_path / 'back'}" in capsys.readouterr().out
