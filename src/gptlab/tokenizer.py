"""One tokenizer interface, three kinds: `gpt2` (OpenAI's BPE via tiktoken), `bpe` (a byte-level BPE
trained on your corpus with Hugging Face tokenizers) and `byte` (raw UTF-8 bytes).

Every kind has an `<|endoftext|>` token that separates documents, and saves itself into a run
directory so generation and serving use exactly the tokenizer the model was trained with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from gptlab.errors import GptlabError

EOT = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
KINDS = ("gpt2", "bpe", "byte")

# GPT-2's pre-tokenisation pattern (from OpenAI's encoder.py), used when building from local files.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Where text can be cut without changing a single token: after a newline that is a whitespace run of its
# own and before printable ASCII, no GPT-2-style pre-tokenizer pattern spans the cut.
SAFE_BREAK = r"(?<=[!-~]\n)(?=[!-~])"
_SAFE_BREAK = re.compile(SAFE_BREAK)


def safe_chunks(text: str, size: int) -> list[str]:
    """`text` cut at safe breaks into pieces of about `size` characters (longer where no break is near),
    so long texts encode piece by piece into exactly the ids of the whole."""
    pieces, start = [], 0
    while len(text) - start > size:
        found = _SAFE_BREAK.search(text, start + size)
        if found is None:
            break
        pieces.append(text[start : found.start()])
        start = found.start()
    pieces.append(text[start:])
    return pieces


class Tokenizer:
    """The interface every kind implements."""

    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of the tokens, so streaming can hold back a character split across tokens."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A string that changes whenever the mapping from text to ids changes (keys prepared data)."""
        return self.kind

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then `<|endoftext|>` as 256."""

    kind = "byte"

    def __init__(self):
        self.eot_id = 256
        self.vocab_size = 257
        self._eot_bytes = EOT.encode()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT)):
            if i:
                ids.append(self.eot_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out += self._eot_bytes
            elif 0 <= i < 256:
                out.append(i)
            else:
                raise GptlabError(f"token id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
        return bytes(out)

    def save(self, directory: str | Path) -> None:
        _write_config(directory, {"kind": self.kind})


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50,257 ids) through tiktoken."""

    kind = "gpt2"

    def __init__(self, encoding=None):
        self._encoding = encoding if encoding is not None else load_gpt2_encoding()
        self.eot_id = self._encoding.eot_token
        self.vocab_size = self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special={EOT})

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encoding.encode_batch(list(texts), allowed_special={EOT})

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise GptlabError(f"token id {outside[0]} is outside the GPT-2 vocabulary of {self.vocab_size}")
        return self._encoding.decode_bytes(ids)

    def save(self, directory: str | Path) -> None:
        _write_config(directory, {"kind": self.kind})


# tiktoken's own copies of the GPT-2 files (the same bytes as the 124M model's), by the names its cache uses.
TIKTOKEN_GPT2_URLS = tuple(
    f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}" for name in ("encoder.json", "vocab.bpe")
)


@functools.lru_cache(maxsize=1)
def load_gpt2_encoding():
    """GPT-2's tiktoken encoding from, in order: encoder.json + vocab.bpe in GPTLAB_DATA_DIR or the gptlab
    cache, tiktoken's own cache, else a sha256-verified download into the gptlab cache."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from gptlab.download import dataset_files, is_available

    if not is_available("gpt2") and _in_tiktoken_cache():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # a damaged tiktoken cache (tiktoken then tries the network): fetch our own copy
            pass
    encoder_json, vocab_bpe = dataset_files("gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def _in_tiktoken_cache() -> bool:
    """Whether tiktoken has the GPT-2 files cached (it looks where this does), so it needs no network."""
    import tempfile

    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = folder or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    names = [hashlib.sha1(url.encode()).hexdigest() for url in TIKTOKEN_GPT2_URLS]
    return all(os.path.isfile(os.path.join(folder, name)) for name in names)


BPE_PIECE_CHARS = 1 << 14


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on your corpus (Hugging Face tokenizers), saved as `tokenizer.json`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        eot = self._tok.token_to_id(EOT)
        if eot is None:
            raise GptlabError(f"the BPE tokenizer has no {EOT} token; retrain it with gptlab")
        self.eot_id = eot
        self.vocab_size = self._tok.get_vocab_size()
        from tokenizers import pre_tokenizers

        # Byte-level BPE spells each byte as a printable character; invert that map for raw bytes.
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        self._char_to_byte = {ch: b for b, ch in _bytes_to_unicode().items() if ch in alphabet}
        self._id_to_bytes: dict[int, bytes] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        check_bpe_vocab_size(vocab_size)
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        # Hugging Face tokenizers slows down superlinearly on long strings: encode safe pieces instead.
        if len(text) <= BPE_PIECE_CHARS:
            return self._tok.encode(text).ids
        return [i for e in self._tok.encode_batch(safe_chunks(text, BPE_PIECE_CHARS)) for i in e.ids]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if all(len(text) <= BPE_PIECE_CHARS for text in texts):
            return [e.ids for e in self._tok.encode_batch(list(texts))]
        return [self.encode(text) for text in texts]

    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    def _token_bytes(self, i: int) -> bytes:
        cached = self._id_to_bytes.get(i)
        if cached is None:
            token = self._tok.id_to_token(i) if 0 <= i < self.vocab_size else None
            if token is None:
                raise GptlabError(f"token id {i} is outside the BPE vocabulary of {self.vocab_size}")
            cached = token.encode() if i == self.eot_id else bytes(self._char_to_byte[ch] for ch in token)
            self._id_to_bytes[i] = cached
        return cached

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._token_bytes(int(i)) for i in ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        _write_config(directory, {"kind": self.kind})


# The largest BPE vocabulary gptlab trains: 10x the largest in common use (Gemma's 256,000). The trainer
# allocates memory in proportion to the size asked for and aborts the process when it cannot.
MAX_BPE_VOCAB_SIZE = 2_560_000


def check_bpe_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE needs its 256 byte tokens and the special tokens before any merge."""
    if vocab_size < 257:
        raise GptlabError(
            f"BPE vocabulary size {vocab_size} is too small: it needs 256 byte tokens plus {EOT}; use 257 or more"
        )
    if vocab_size > MAX_BPE_VOCAB_SIZE:
        raise GptlabError(
            f"BPE vocabulary size {vocab_size:,} is larger than gptlab trains ({MAX_BPE_VOCAB_SIZE:,}); "
            "GPT-2 uses 50,257, and 4,096-32,768 suit small corpora"
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the published byte-level scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _write_config(directory: str | Path, values: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(values, indent=2) + "\n")


def build_tokenizer(kind: str, texts: Iterable[str] | None = None, vocab_size: int = 4096) -> Tokenizer:
    """A tokenizer of `kind`; `bpe` is trained on `texts` to `vocab_size` ids."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        if texts is None:
            raise GptlabError("a bpe tokenizer needs a corpus to train on")
        return BPETokenizer.train(texts, vocab_size)
    raise GptlabError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory` by `Tokenizer.save`."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise GptlabError(f"no tokenizer in {directory} (missing {CONFIG_FILE})")
    kind = json.loads(config_path.read_text()).get("kind")
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise GptlabError(f"BPE tokenizer file {path} is missing")
        return BPETokenizer(HFTokenizer.from_file(os.fspath(path)))
    return build_tokenizer(kind)
