"""The three tokenizer kinds: exact GPT-2 ids, round trips on any text, save/load, BPE training speed."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.tokenizer import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    build_tokenizer,
    load_tokenizer,
    safe_chunks,
)

TEXT_FILES = (
    "the-verdict.txt",
    "tinyshakespeare.txt",
    "instruction-data.json",
    "instruction-data-with-preference.json",
    "spam/SMSSpamCollection",
)


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    from gptlab.data import embedded_default_text

    return BPETokenizer.train([embedded_default_text()[:200_000]], vocab_size=600)


@pytest.fixture(scope="module")
def tokenizers(gpt2, bpe):
    return [gpt2, bpe, ByteTokenizer()]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """transformers' GPT-2 tokenizer built from the same two files (under the names it expects)."""
    from transformers import GPT2TokenizerFast

    from gptlab.download import dataset_files

    encoder_json, vocab_bpe = dataset_files("gpt2", download=False)
    folder = tmp_path_factory.mktemp("hf-gpt2")
    (folder / "vocab.json").symlink_to(encoder_json)
    (folder / "merges.txt").symlink_to(vocab_bpe)
    return GPT2TokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("name", TEXT_FILES)
def test_gpt2_ids_equal_tiktoken_and_transformers(shared_data, gpt2, hf_gpt2, name):
    import tiktoken

    text = (shared_data / name).read_text(encoding="utf-8")
    reference = tiktoken.get_encoding("gpt2").encode(text)
    assert len(reference) > 1000
    assert gpt2.encode(text) == reference
    assert hf_gpt2(text)["input_ids"] == reference
    assert gpt2.decode(reference) == text


def test_gpt2_vocabulary_and_end_of_text(gpt2):
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert gpt2.encode(f"a{EOT}b") == [64, 50256, 65]


def test_text_cut_at_safe_breaks_encodes_to_the_ids_of_the_whole(shared_data, tokenizers):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:120_000] + "  \n\n\n  trailing  \n"
    pieces = safe_chunks(text, 5000)
    assert len(pieces) > 10 and "".join(pieces) == text
    for tok in tokenizers:
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text), tok.kind


def test_long_bpe_text_encodes_like_hugging_face_on_the_whole(bpe):
    from gptlab.data import embedded_default_text

    text = embedded_default_text()[:100_000]
    assert bpe.encode(text) == bpe._tok.encode(text).ids


@settings(max_examples=150, deadline=None)
@given(text=st.text(), eot_at=st.integers(min_value=0, max_value=1000))
def test_decode_inverts_encode_for_any_text(tokenizers, text, eot_at):
    text = text[:eot_at] + EOT + text[eot_at:] if eot_at % 3 == 0 else text
    for tok in tokenizers:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, tok.kind
        assert tok.encode_batch([text, ""]) == [ids, []]


def test_decode_bytes_keeps_a_character_split_across_tokens():
    tok = ByteTokenizer()
    ids = tok.encode("é")
    assert ids == [195, 169]
    assert tok.decode_bytes(ids[:1]) == b"\xc3" and tok.decode(ids[:1]) == "\ufffd"


def test_end_of_text_is_one_token_in_every_kind(tokenizers):
    for tok in tokenizers:
        assert tok.encode(EOT) == [tok.eot_id]
        assert tok.decode([tok.eot_id]) == EOT


def test_ids_outside_the_vocabulary_are_refused(tokenizers):
    for tok in tokenizers:
        for bad in (tok.vocab_size, -1):
            with pytest.raises(GptlabError, match=f"token id {bad} is outside"):
                tok.decode([0, bad])


def test_save_and_load_beside_a_run(tmp_path, tokenizers):
    for tok in tokenizers:
        folder = tmp_path / tok.kind
        tok.save(folder)
        loaded = load_tokenizer(folder)
        text = "Saved beside the run: ünïcödé, 12345 " + EOT
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.fingerprint() == tok.fingerprint()
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()


def test_bpe_fingerprint_changes_with_the_merges(bpe):
    other = BPETokenizer.train(["a completely different little corpus " * 50], vocab_size=300)
    assert other.fingerprint() != bpe.fingerprint()


def test_bpe_training_4096_merges_on_tinyshakespeare_takes_seconds(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    started = time.perf_counter()
    tok = build_tokenizer("bpe", [text], vocab_size=256 + 1 + 4096)
    seconds = time.perf_counter() - started
    assert tok.vocab_size == 256 + 1 + 4096
    assert seconds < 30, f"training took {seconds:.1f} s"
    assert len(tok.encode(text[:10_000])) < 10_000 / 2.5  # the merges compress Shakespeare


def test_vocabulary_too_small_for_the_special_tokens():
    with pytest.raises(GptlabError, match="too small.*257"):
        build_tokenizer("bpe", ["some text"], vocab_size=256)


def test_a_vocabulary_too_large_to_train_is_refused_before_training():
    # The trainer would try to allocate hundreds of GB for 1e10 and abort the process.
    with pytest.raises(GptlabError, match="10,000,000,000 is larger than gptlab trains"):
        build_tokenizer("bpe", ["some text"], vocab_size=10**10)


def test_unknown_kind_and_missing_tokenizer(tmp_path):
    with pytest.raises(GptlabError, match="unknown tokenizer kind 'sentencepiece'"):
        build_tokenizer("sentencepiece")
    with pytest.raises(GptlabError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(GptlabError, match="needs a corpus"):
        build_tokenizer("bpe")
