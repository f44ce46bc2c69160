"""Import of transformers GPT-2 directories and GPT-2's published weights, export of runs to transformers."""

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptlab import interop
from gptlab.checkpoint import load_run, read_run_config, save_checkpoint, write_run_config
from gptlab.classify import GPTClassifier, pad_batch
from gptlab.config import GenerationConfig, GPTConfig, LoRAConfig, config_to_dict
from gptlab.errors import GptlabError
from gptlab.generate import generate_ids
from gptlab.interop import LazyTensor, export_run, import_gpt2, import_hf, write_safetensors
from gptlab.lora import apply_lora, lora_state_dict
from gptlab.model import GPT
from gptlab.tokenizer import EOT, BPETokenizer, ByteTokenizer, GPT2Tokenizer

transformers = pytest.importorskip("transformers")

GPT2_VOCAB = 50257
TEXT = "Hello world, it's 3.14 naïve café 🙂!" + EOT + "  The end\n"


def save_hf_gpt2(directory: Path, tie: bool = True, vocab_size: int = GPT2_VOCAB, **save_kwargs):
    """A transformers GPT-2 with random weights (biases too), saved to `directory`; returns the model."""
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=tie,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(directory, **save_kwargs)
    return model


def gptlab_logits(run: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_run(run).model(idx)


def make_run(run_dir: Path, config: GPTConfig, tokenizer, model=None, **run_fields) -> GPT:
    """A gptlab run written by hand: config.yaml, tokenizer, one checkpoint of random weights."""
    model = model or GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    write_run_config(run_dir, {"task": "pretrain", "model": config_to_dict(model.config), **run_fields})
    tokenizer.save(run_dir / "tokenizer")
    save_checkpoint(run_dir, 1, model.state_dict(), {"step": 1})
    return model.eval()


# ---------------------------------------------------------------- import hf


@pytest.mark.parametrize("tie", [True, False])
def test_imported_directory_gives_transformers_logits_and_greedy_tokens(tmp_path, shared_data, tie):
    hf = save_hf_gpt2(tmp_path / "hf", tie=tie)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    loaded = load_run(run)
    assert isinstance(loaded.tokenizer, GPT2Tokenizer)
    assert loaded.model.config.tie_embeddings == tie
    idx = torch.randint(0, GPT2_VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.allclose(loaded.model(idx), hf(idx).logits, atol=1e-5)
        prompt = torch.randint(0, GPT2_VOCAB, (1, 5))
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=12, stop_at_eot=False)
    assert generate_ids(loaded.model, prompt.tolist(), greedy) == [expected[0, 5:].tolist()]


def test_sharded_safetensors_and_pytorch_bin_import_alike(tmp_path, shared_data):
    hf = save_hf_gpt2(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    idx = torch.randint(0, GPT2_VOCAB, (1, 10))
    with torch.no_grad():
        expected = hf(idx).logits
    for source in ("sharded", "bin"):
        run = import_hf(tmp_path / source, tmp_path / f"run-{source}")
        assert torch.allclose(gptlab_logits(run, idx), expected, atol=1e-5), source


def test_write_safetensors_loads_each_tensor_only_after_writing_the_previous(tmp_path):
    path = tmp_path / "w.safetensors"
    values = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(2, 2, 2).double()}
    sizes_at_load = []

    def loader(name):
        sizes_at_load.append(path.stat().st_size)
        return values[name]

    write_safetensors(
        path, {n: LazyTensor(tuple(t.shape), t.dtype, functools.partial(loader, n)) for n, t in values.items()}
    )
    assert sizes_at_load == sorted(sizes_at_load) and len(set(sizes_at_load)) == 3  # the file grew between loads
    back = load_file(path)
    assert all(torch.equal(back[n], t) for n, t in values.items())


def test_import_refuses_an_existing_run_unless_forced(tmp_path, shared_data):
    save_hf_gpt2(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(GptlabError, match="already exists"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    import_hf(tmp_path / "hf", tmp_path / "run", force=True)
    assert not (tmp_path / "run" / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_force_replaces_only_an_earlier_import_or_export(tmp_path, shared_data):
    save_hf_gpt2(tmp_path / "hf")
    config = GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=1, n_embd=8)
    make_run(tmp_path / "run", config, ByteTokenizer())
    make_run(tmp_path / "other", config, ByteTokenizer())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(GptlabError, match="notes is not an earlier import .*--force does not replace it"):
        import_hf(tmp_path / "hf", tmp_path / "notes", force=True)
    (tmp_path / "other" / "metrics.jsonl").write_text("{}\n")  # a run that trained is never an earlier import
    with pytest.raises(GptlabError, match="other is not an earlier import"):
        import_hf(tmp_path / "hf", tmp_path / "other", force=True)
    for folder in ("notes", "other"):
        with pytest.raises(GptlabError, match=f"{folder} is not an earlier export"):
            export_run(tmp_path / "run", tmp_path / folder, force=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and (tmp_path / "other" / "config.yaml").is_file()
    (tmp_path / "empty").mkdir()
    export_run(tmp_path / "run", tmp_path / "empty")
    export_run(tmp_path / "other", tmp_path / "empty", force=True)  # an earlier export is replaced
    assert (tmp_path / "empty" / "config.json").is_file()
    import_hf(tmp_path / "empty", tmp_path / "imported", tokenizer="byte")
    import_hf(tmp_path / "empty", tmp_path / "imported", tokenizer="byte", force=True)  # an earlier import


@pytest.mark.parametrize("out", ["{run}", "{root}", "{link}"])
def test_export_refuses_a_directory_that_is_or_holds_the_run(tmp_path, out):
    config = GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=1, n_embd=8)
    run = tmp_path / "runs" / "mine"
    make_run(run, config, ByteTokenizer())
    (tmp_path / "link").symlink_to(run)
    out_dir = Path(out.format(run=run, root=tmp_path / "runs", link=tmp_path / "link"))
    with pytest.raises(GptlabError, match="is or holds .*which it is made from"):
        export_run(run, out_dir, force=True)
    with pytest.raises(GptlabError, match="is or holds"):
        export_run(run / "checkpoints" / "step-0000001", out_dir, force=True)
    assert load_run(run).model.config == config  # the run is untouched


def test_an_instruction_tuned_runs_template_survives_export_and_import(tmp_path):
    config = GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=1, n_embd=8)
    make_run(tmp_path / "run", config, ByteTokenizer(), template="chat")
    export_run(tmp_path / "run", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert read_run_config(tmp_path / "back")["template"] == "chat"
    make_run(tmp_path / "plain", config, ByteTokenizer())
    export_run(tmp_path / "plain", tmp_path / "plain-hf")
    import_hf(tmp_path / "plain-hf", tmp_path / "plain-back")
    assert "template" not in read_run_config(tmp_path / "plain-back")


def test_export_into_a_folder_inside_the_run_is_allowed(tmp_path):
    run = tmp_path / "mine"
    make_run(run, GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=1, n_embd=8), ByteTokenizer())
    export_run(run, run / "hf")
    export_run(run, run / "hf", force=True)
    assert (run / "hf" / "config.json").is_file() and (run / "config.yaml").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "hf").stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary directory, not mkdtemp's 0700


def test_import_refuses_to_write_over_its_source(tmp_path, shared_data):
    save_hf_gpt2(tmp_path / "hf")
    with pytest.raises(GptlabError, match="is or holds"):
        import_hf(tmp_path / "hf", tmp_path / "hf", force=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# ---------------------------------------------------------------- bad input


def _one_line_error(directory, run_dir, match):
    with pytest.raises(GptlabError, match=match) as info:
        import_hf(directory, run_dir, tokenizer="byte")
    assert "\n" not in str(info.value)
    assert not run_dir.exists()


def test_a_llama_directory_is_refused(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _one_line_error(tmp_path / "llama", tmp_path / "run", r"'llama' model; gptlab imports GPT-2")


def test_gpt2_options_gptlab_lacks_are_refused(tmp_path):
    save_hf_gpt2(tmp_path / "hf", vocab_size=257)
    values = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**values, "scale_attn_by_inverse_layer_idx": True}))
    _one_line_error(tmp_path / "hf", tmp_path / "run", "scale_attn_by_inverse_layer_idx=True")


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    save_hf_gpt2(tmp_path / "hf", vocab_size=257)
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}, weights)
    _one_line_error(tmp_path / "hf", tmp_path / "run", r"lacks tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'")
    save_file({**state, "transformer.h.0.attn.c_attn.bias": torch.zeros(40)}, weights)
    _one_line_error(
        tmp_path / "hf", tmp_path / "run", r"'transformer\.h\.0\.attn\.c_attn\.bias' in .* has shape \(40,\)"
    )


def test_truncated_weights_and_missing_files_are_named(tmp_path):
    save_hf_gpt2(tmp_path / "hf", vocab_size=257)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _one_line_error(tmp_path / "hf", tmp_path / "run", "model.safetensors is truncated or not a safetensors file")
    weights.unlink()
    _one_line_error(tmp_path / "hf", tmp_path / "run", "holds no model.safetensors")
    _one_line_error(tmp_path, tmp_path / "run", "has no config.json")


def test_a_tokenizer_that_cannot_be_guessed_must_be_named(tmp_path):
    save_hf_gpt2(tmp_path / "hf", vocab_size=300)
    with pytest.raises(GptlabError, match="pass --tokenizer gpt2, bpe"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    import_hf(tmp_path / "hf", tmp_path / "run", tokenizer="byte")
    assert isinstance(load_run(tmp_path / "run").tokenizer, ByteTokenizer)


# ---------------------------------------------------------------- export


def _bpe_tokenizer(shared_data):
    return BPETokenizer.train([(shared_data / "the-verdict.txt").read_text()], 300)


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "byte"])
def test_export_loads_in_transformers_with_same_logits_and_token_ids(tmp_path, shared_data, kind):
    tokenizer = {"gpt2": GPT2Tokenizer, "bpe": lambda: _bpe_tokenizer(shared_data), "byte": ByteTokenizer}[kind]()
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=2, n_head=2, n_embd=16)
    model = make_run(tmp_path / "run", config, tokenizer)
    out = export_run(tmp_path / "run", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(TEXT)
    assert hf_tokenizer(TEXT)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == TEXT
    idx = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx), atol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [
        dict(tie_embeddings=True),
        dict(tie_embeddings=False, qkv_bias=False),
        dict(tie_embeddings=False, bias=False, qkv_bias=False, context_length=40),
    ],
)
def test_round_trip_through_transformers_keeps_config_and_weights(tmp_path, shape):
    config = GPTConfig(**{"vocab_size": 257, "context_length": 24, "n_layer": 2, "n_head": 2, "n_embd": 16, **shape})
    model = make_run(tmp_path / "run", config, ByteTokenizer())
    export_run(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf-saved")  # transformers' own files, not ours
    back = load_run(import_hf(tmp_path / "hf-saved", tmp_path / "back"))
    assert back.model.config == config
    assert isinstance(back.tokenizer, ByteTokenizer)
    original, returned = model.state_dict(), back.model.state_dict()
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[name], returned[name]) for name in original)
    if config.tie_embeddings:
        assert back.model.lm_head.weight is back.model.token_embedding.weight


def test_untied_export_stores_its_head_and_tied_export_does_not(tmp_path):
    for tie in (True, False):
        config = GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=1, n_embd=8, tie_embeddings=tie)
        make_run(tmp_path / f"run-{tie}", config, ByteTokenizer())
        export_run(tmp_path / f"run-{tie}", tmp_path / f"hf-{tie}")
        with safe_open(tmp_path / f"hf-{tie}" / "model.safetensors", "pt") as f:
            assert ("lm_head.weight" in f.keys()) == (not tie)
        assert json.loads((tmp_path / f"hf-{tie}" / "config.json").read_text())["tie_word_embeddings"] == tie


def test_classification_run_exports_as_sequence_classifier_with_its_labels(tmp_path):
    config = GPTConfig(vocab_size=257, context_length=24, n_layer=2, n_head=2, n_embd=16)
    classify = {"labels": ["ham", "spam"], "pooling": "last"}
    model = make_run(
        tmp_path / "run", config, ByteTokenizer(), GPTClassifier(config, 2), task="classify", classify=classify
    )
    export_run(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    batch = pad_batch([[72, 105], [1, 2, 3, 4, 5, 6, 7], [200]], pad_id=256)  # right-padded with <|endoftext|>
    with torch.no_grad():
        expected = model(batch["input"], batch["attention_mask"])
        assert torch.allclose(hf(batch["input"]).logits, expected, atol=1e-5)
        # Its tokenizer pads a batch of texts itself, with the pad id config.json gives the classifier.
        texts = ["Hi", "a longer text", "x"]
        padded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(texts, padding=True, return_tensors="pt")
        assert (padded["input_ids"] == hf.config.pad_token_id).any()
        assert torch.allclose(hf(**padded).logits, model(padded["input_ids"], padded["attention_mask"]), atol=1e-5)


def test_sequence_classifier_imports_back_as_the_same_classification_run(tmp_path):
    config = GPTConfig(vocab_size=257, context_length=24, n_layer=2, n_head=2, n_embd=16, qkv_bias=False)
    classify = {"labels": ["neg", "neutral", "pos"], "pooling": "last"}
    model = make_run(
        tmp_path / "run", config, ByteTokenizer(), GPTClassifier(config, 3), task="classify", classify=classify
    )
    export_run(tmp_path / "run", tmp_path / "hf")
    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "saved")
    back = load_run(import_hf(tmp_path / "saved", tmp_path / "back"))
    assert back.config["task"] == "classify" and back.config["classify"] == classify
    assert back.model.config == config
    original, returned = model.state_dict(), back.model.state_dict()
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[name], returned[name]) for name in original)


def test_mean_pooled_classifier_is_refused_by_export(tmp_path):
    config = GPTConfig(vocab_size=257, context_length=24, n_layer=1, n_head=2, n_embd=16)
    classify = {"labels": ["a", "b"], "pooling": "mean"}
    make_run(
        tmp_path / "run", config, ByteTokenizer(), GPTClassifier(config, 2, "mean"), task="classify", classify=classify
    )
    with pytest.raises(GptlabError, match="pools with 'mean'"):
        export_run(tmp_path / "run", tmp_path / "hf")


def test_lora_run_exports_merged_weights(tmp_path):
    config = GPTConfig(vocab_size=257, context_length=24, n_layer=2, n_head=2, n_embd=16)
    make_run(tmp_path / "base", config, ByteTokenizer())
    lora = LoRAConfig(rank=2, targets=["attn.qkv", "mlp.fc"])
    model = apply_lora(load_run(tmp_path / "base").model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)  # a trained adapter changes the outputs
    run_fields = {"task": "pretrain", "model": config_to_dict(config), "lora": config_to_dict(lora)}
    write_run_config(tmp_path / "lora", {**run_fields, "init_from": str(tmp_path / "base")})
    ByteTokenizer().save(tmp_path / "lora" / "tokenizer")
    save_checkpoint(tmp_path / "lora", 5, lora_state_dict(model), {"step": 5})
    export_run(tmp_path / "lora", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        expected = load_run(tmp_path / "lora").model(idx)
        assert not torch.allclose(expected, load_run(tmp_path / "base").model(idx), atol=1e-4)
        assert torch.allclose(hf(idx).logits, expected, atol=1e-5)


# ---------------------------------------------------------------- import gpt2 (download)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local HTTP server laid out like huggingface.co, serving a tiny random GPT-2 as `gpt2`."""
    repo = tmp_path / "hub" / "openai-community" / "gpt2" / "resolve" / "main"
    model = save_hf_gpt2(repo)
    weights = (repo / "model.safetensors").read_bytes()
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "hub"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GPTLAB_HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    known = {("gpt2", "model.safetensors"): (len(weights), hashlib.sha256(weights).hexdigest())}
    monkeypatch.setattr(interop, "GPT2_KNOWN_FILES", known)
    yield model
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_import_gpt2_downloads_verifies_and_imports(tmp_path, shared_data, hub):
    run = import_gpt2("gpt2", tmp_path / "run", progress=False)
    cached = tmp_path / "cache" / "hf" / "openai-community" / "gpt2"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]
    idx = torch.randint(0, GPT2_VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.allclose(gptlab_logits(run, idx), hub(idx).logits, atol=1e-5)
    assert isinstance(load_run(run).tokenizer, GPT2Tokenizer)


def test_import_gpt2_rejects_a_download_with_the_wrong_checksum(tmp_path, shared_data, hub, monkeypatch):
    size, _ = interop.GPT2_KNOWN_FILES[("gpt2", "model.safetensors")]
    monkeypatch.setattr(interop, "GPT2_KNOWN_FILES", {("gpt2", "model.safetensors"): (size, "0" * 64)})
    with pytest.raises(GptlabError, match="sha256 does not match"):
        import_gpt2("gpt2", tmp_path / "run", progress=False)
    assert not (tmp_path / "cache" / "hf" / "openai-community" / "gpt2" / "model.safetensors").exists()


def test_a_damaged_cached_download_names_the_folder_to_delete(tmp_path, shared_data, hub):
    cached = tmp_path / "cache" / "hf" / "openai-community" / "gpt2"
    import_gpt2("gpt2", tmp_path / "run", progress=False)
    (cached / "config.json").write_text("<html>a proxy's error page</html>")  # no published checksum to catch it
    with pytest.raises(GptlabError, match=f"is not valid JSON .*; if a download went wrong, delete {cached} and"):
        import_gpt2("gpt2", tmp_path / "again", progress=False)


def test_offline_import_names_the_files_their_urls_and_where_to_put_them(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("GPTLAB_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(GptlabError) as info:
        import_gpt2("gpt2-medium", tmp_path / "run", progress=False)
    message = str(info.value)
    dest = tmp_path / "cache" / "hf" / "openai-community" / "gpt2-medium"
    for name in ("config.json", "model.safetensors"):
        assert f"http://127.0.0.1:9/openai-community/gpt2-medium/resolve/main/{name} to {dest / name}" in message
    assert "\n" not in message


def test_import_gpt2_uses_files_already_in_the_data_folder(tmp_path, shared_data, monkeypatch):
    data = tmp_path / "data"
    model = save_hf_gpt2(data / "hf" / "openai-community" / "gpt2-large")
    (data / "gpt2").symlink_to(shared_data / "gpt2")
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(data))
    monkeypatch.setenv("GPTLAB_HF_ENDPOINT", "http://127.0.0.1:9")
    run = import_gpt2("gpt2-large", tmp_path / "run", progress=False)
    idx = torch.randint(0, GPT2_VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.allclose(gptlab_logits(run, idx), model(idx).logits, atol=1e-5)


def test_dpo_log_probs_and_gradients_match_transformers(tmp_path, shared_data):
    """The DPO loss on an imported GPT-2 (its 50,257-token head in chunks, recomputed in backward) against the
    same loss from transformers' logits: values and the gradient of the shared embedding agree."""
    from gptlab.preference import dpo_loss, response_log_probs

    hf = save_hf_gpt2(tmp_path / "hf")
    ours = load_run(import_hf(tmp_path / "hf", tmp_path / "run")).model
    torch.manual_seed(0)
    inputs = torch.randint(0, GPT2_VOCAB, (8, 60))  # 4 pairs: 480 positions, more than one 333-row chunk
    targets = torch.roll(inputs, -1, dims=1)
    targets[:, :20] = -100  # the prompt
    targets[1, 50:] = -100  # a shorter answer, padded
    reference = torch.randn(4, 2) - 400.0
    batch = {"input": inputs, "target": targets}

    loss, _ = dpo_loss(response_log_probs(ours, batch), reference, beta=0.1)
    loss.backward()
    logprobs = torch.log_softmax(hf(inputs).logits, dim=-1)
    picked = logprobs.gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * (targets != -100)
    expected, _ = dpo_loss(picked.sum(1).view(2, -1).t(), reference, beta=0.1)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    theirs = hf.transformer.wte.weight.grad
    assert theirs.abs().max() > 1e-4 and torch.allclose(ours.token_embedding.weight.grad, theirs, atol=1e-6, rtol=1e-4)


def test_eval_perplexity_of_an_imported_gpt2_equals_transformers_loss(tmp_path, shared_data, capsys, monkeypatch):
    from gptlab.cli import main
    from gptlab.config import DataConfig
    from gptlab.data import prepare_corpus

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    hf = save_hf_gpt2(tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    text = shared_data / "the-verdict.txt"
    assert main(["eval", "perplexity", str(run), "--data", str(text), "--json", "--max-tokens", "300"]) == 0
    ours = json.loads(capsys.readouterr().out)

    tokens = prepare_corpus(DataConfig(source=str(text)), tokenizer=load_run(run).tokenizer).val_tokens[:301]
    total = 0.0
    with torch.no_grad():
        for begin in range(0, 300, 64):  # the model's context: non-overlapping windows
            window = torch.tensor(tokens[begin : min(begin + 64, 300) + 1].astype("int64"))[None]
            logits = hf(window[:, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    assert ours["tokens"] == 300 and ours["tokenizer"] == "gpt2"
    assert ours["loss"] == pytest.approx(total / 300, abs=1e-5)
