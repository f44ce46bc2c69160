"""Interoperability with Hugging Face transformers' GPT-2: state-dict conversion, importing a transformers
directory or GPT-2's published weights as a gptlab run, and exporting a run as a transformers directory.

transformers stores GPT-2's linear layers as `Conv1D` with weights shaped (in, out); ours are
`nn.Linear`, shaped (out, in), so every matrix is transposed on the way through. Import reads and
writes one tensor at a time, so converting gpt2-xl needs little more memory than its largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptlab.checkpoint import CONFIG_FILE, ordinary_permissions
from gptlab.config import PRESETS, GPTConfig
from gptlab.errors import GptlabError

# (our name, transformers' name, transposed?) for one block; `{i}` is the block index.
_BLOCK_NAMES = [
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_TOP_NAMES = [
    ("token_embedding.weight", "wte.weight"),
    ("position_embedding.weight", "wpe.weight"),
    ("ln_f.weight", "ln_f.weight"),
    ("ln_f.bias", "ln_f.bias"),
]

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
GPT2_SIZES = tuple(name for name in PRESETS if name.startswith("gpt2"))
# (bytes, sha256) of published files where known; the others are checked against the server's Content-Length.
GPT2_KNOWN_FILES: dict[tuple[str, str], tuple[int, str]] = {
    ("gpt2", HF_WEIGHTS): (548_105_171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
}
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
# (whether a directory is one, its description) of what import and export write: --force replaces only
# these. An imported run has a config but has never trained (no metrics.jsonl): a trained run is kept.
_RUN = (
    lambda path: (path / CONFIG_FILE).is_file() and not (path / "metrics.jsonl").exists(),
    "an earlier import (a gptlab run with config.yaml that never trained)",
)
_EXPORT = (lambda path: (path / HF_CONFIG).is_file(), "an earlier export (a transformers directory with config.json)")


# ---------------------------------------------------------------- names and shapes


def name_pairs(config: GPTConfig):
    """Yield (our name, transformers' name without the `transformer.` prefix, transposed?) for a config."""
    for ours, theirs in _TOP_NAMES:
        if ours.endswith("bias") and not config.bias:
            continue
        yield ours, theirs, False
    for i in range(config.n_layer):
        for ours, theirs, transposed in _BLOCK_NAMES:
            if ours.endswith("bias") and not (config.qkv_bias if ours.startswith("attn.qkv") else config.bias):
                continue
            yield f"blocks.{i}.{ours}", f"h.{i}.{theirs}", transposed


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of gptlab's GPT for a config."""
    C, V = config.n_embd, config.vocab_size
    block = {
        "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
        "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
        "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
        "mlp.fc.weight": (4 * C, C), "mlp.fc.bias": (4 * C,),
        "mlp.proj.weight": (C, 4 * C), "mlp.proj.bias": (C,),
    }  # fmt: skip
    shapes = {
        "token_embedding.weight": (V, C),
        "position_embedding.weight": (config.context_length, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
        "lm_head.weight": (V, C),
    }
    for i in range(config.n_layer):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def conversion_plan(
    shapes: Mapping[str, tuple[int, ...]], config: GPTConfig, source: str, head: str = "lm_head.weight"
) -> list[tuple[str, str, bool]]:
    """(our name, transformers' key, transposed?) for every tensor `config` needs, after checking that
    `shapes` (transformers' key -> shape) has each of them in the right shape.

    Keys may carry the `transformer.` prefix or not (the published checkpoints have none). `head` is
    the key of an untied output layer (`score.weight` for a classifier). `source` names the file in errors.
    """
    prefix = "transformer." if any(key.startswith("transformer.") for key in shapes) else ""
    pairs = [(ours, prefix + theirs, transposed) for ours, theirs, transposed in name_pairs(config)]
    if not config.tie_embeddings or head != "lm_head.weight":
        pairs.append(("lm_head.weight", head, False))
    want = expected_shapes(config)
    for ours, key, transposed in pairs:
        if key not in shapes:
            raise GptlabError(f"{source} lacks tensor {key!r}; the checkpoint is incomplete or not this GPT-2 size")
        need = want[ours][::-1] if transposed else want[ours]
        if ours == "lm_head.weight" and head != "lm_head.weight":
            need = (shapes[key][0], config.n_embd)  # a classifier's rows are its labels
        if tuple(shapes[key]) != need:
            raise GptlabError(
                f"tensor {key!r} in {source} has shape {tuple(shapes[key])}, but its config needs {need}; "
                "the weights and config.json belong to different models"
            )
    return pairs


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Convert a transformers GPT2LMHeadModel / GPT2Model state dict into gptlab's GPT state dict."""
    plan = conversion_plan({key: tuple(t.shape) for key, t in hf_state.items()}, config, "the GPT-2 weights")
    ours = {name: _transposed(hf_state[key], transposed) for name, key, transposed in plan}
    if "lm_head.weight" not in ours:
        ours["lm_head.weight"] = ours["token_embedding.weight"]
    return ours


def state_dict_to_hf(state: Mapping[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Convert gptlab's GPT state dict into transformers' GPT2LMHeadModel layout."""
    return {key: tensor.load() for key, tensor in lazy_hf_tensors(state, config).items()}


def _transposed(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return (tensor.t() if transposed else tensor).contiguous()


# ---------------------------------------------------------------- safetensors, one tensor at a time


@dataclass
class LazyTensor:
    """A tensor's shape and dtype now, its values only when `load` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def write_safetensors(path: Path, tensors: Mapping[str, LazyTensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are loaded and written one after another.

    The header (names, dtypes, shapes, offsets) is known from the lazy tensors before any is loaded,
    so only one tensor is ever in memory.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, tensor in tensors.items():
        end = offset + math.prod(tensor.shape) * tensor.dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for lazy in tensors.values():
            tensor = lazy.load().contiguous()
            f.write(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
            f.flush()  # hand each tensor to the OS before loading the next
        os.fsync(f.fileno())


class HFCheckpoint:
    """The tensors of a transformers checkpoint directory, each read only when asked for.

    Reads model.safetensors, sharded safetensors (model.safetensors.index.json) or a pytorch_model.bin
    (through `torch.load(weights_only=True, mmap=True)`: nothing but tensors is unpickled).
    """

    def __init__(self, directory: Path):
        self.source, files = _weight_files(directory)
        self._handles = {path: _open_weights(path) for path in files}
        self._file_of = {name: path for path, handle in self._handles.items() for name in handle.keys()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._shape(name) for name in self._file_of}

    def _shape(self, name: str) -> tuple[int, ...]:
        handle = self._handles[self._file_of[name]]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        handle = self._handles[self._file_of[name]]
        if isinstance(handle, dict):
            return handle[name].dtype
        code = handle.get_slice(name).get_dtype()
        if code not in _DTYPES_BY_CODE:
            raise GptlabError(
                f"tensor {name!r} in {self._file_of[name]} has dtype {code}; gptlab imports float weights"
            )
        return _DTYPES_BY_CODE[code]

    def load(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        handle = self._handles[path]
        try:
            return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
        except Exception as exc:
            raise GptlabError(f"cannot read tensor {name!r} from {path} ({_first_line(exc)})") from None

    def lazy(self, key: str, transposed: bool) -> LazyTensor:
        shape = self._shape(key)
        return LazyTensor(
            shape[::-1] if transposed else shape, self.dtype(key), lambda: _transposed(self.load(key), transposed)
        )


def _weight_files(directory: Path) -> tuple[str, list[Path]]:
    """(name for errors, weight files) of a transformers directory, safetensors preferred."""
    for index_name, single in (
        ("model.safetensors.index.json", HF_WEIGHTS),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (directory / single).is_file():
            return str(directory / single), [directory / single]
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise GptlabError(f"{index} is not a transformers weight index (no weight_map)") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            for path in files:
                if not path.is_file():
                    raise GptlabError(f"{path} is missing; {index} lists it as a shard of the weights")
            return str(index), files
    raise GptlabError(
        f"{directory} holds no {HF_WEIGHTS} (nor pytorch_model.bin, nor a sharded index); is it a transformers model?"
    )


def _open_weights(path: Path):
    """A safetensors reader (lazy) or, for .bin, the memory-mapped dict of tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            return safe_open(os.fspath(path), framework="pt")
        except Exception as exc:
            raise GptlabError(f"{path} is truncated or not a safetensors file ({_first_line(exc)})") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GptlabError(f"{path} cannot be loaded as plain tensors (weights_only) ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise GptlabError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- transformers config.json


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / HF_CONFIG
    if not path.is_file():
        raise GptlabError(f"{directory} has no {HF_CONFIG}; give a transformers model directory")
    try:
        values = json.loads(path.read_text())
    except ValueError as exc:
        raise GptlabError(f"{path} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(values, dict):
        raise GptlabError(f"{path} must hold a JSON object")
    return values


def gpt_config_from_hf(values: Mapping[str, Any], source: str) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 config.json (missing keys take GPT2Config's defaults).

    Anything GPT-2's architecture does not allow is a one-line error naming the key.
    """
    model_type = values.get("model_type")
    if model_type != "gpt2":
        raise GptlabError(f"{source} describes a {model_type!r} model; gptlab imports GPT-2 (model_type 'gpt2') only")
    n_embd = values.get("n_embd", 768)
    supported = {
        "activation_function": values.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": values.get("n_inner") in (None, 4 * n_embd),
        "scale_attn_weights": values.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": not values.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": not values.get("add_cross_attention", False),
    }
    for key, ok in supported.items():
        if not ok:
            raise GptlabError(f"{source} sets {key}={values.get(key)!r}, which gptlab's GPT does not implement")
    return GPTConfig(
        vocab_size=values.get("vocab_size", 50257),
        context_length=values.get("n_positions", 1024),
        n_layer=values.get("n_layer", 12),
        n_head=values.get("n_head", 12),
        n_embd=n_embd,
        dropout=values.get("resid_pdrop", 0.1),
        layer_norm_epsilon=values.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=values.get("tie_word_embeddings", True),
    )


def hf_config(
    config: GPTConfig, eot_id: int, tokenizer_kind: str, labels: list[str] | None = None, template: str | None = None
) -> dict[str, Any]:
    """transformers' config.json for a gptlab model; `labels` makes it a GPT2ForSequenceClassification.

    The `gptlab` entry records what GPT-2's config cannot say (biases a model was trained without,
    the tokenizer kind, an instruction-tuned run's prompt `template`), so importing the export gives
    back the same run.
    """
    values: dict[str, Any] = {
        "architectures": ["GPT2ForSequenceClassification" if labels else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": "float32",
        "gptlab": {
            "qkv_bias": config.qkv_bias,
            "bias": config.bias,
            "tokenizer": tokenizer_kind,
            **({"template": template} if template else {}),
        },
    }
    if labels:
        values["id2label"] = {str(i): label for i, label in enumerate(labels)}
        values["label2id"] = {label: i for i, label in enumerate(labels)}
        values["pad_token_id"] = eot_id  # GPT2ForSequenceClassification reads the last token before padding
    return values


# ---------------------------------------------------------------- tokenizers


def import_tokenizer(directory: Path, hf_values: Mapping[str, Any], choice: str = "auto"):
    """The gptlab tokenizer of a transformers directory's model: `choice` (gpt2, bpe, byte), or for
    `auto` the kind a gptlab export recorded, else GPT-2's own when the directory has GPT-2's
    vocab.json (or no tokenizer files and GPT-2's vocabulary size), else its byte-level tokenizer.json."""
    from gptlab.tokenizer import build_tokenizer

    kind = choice
    if choice == "auto":
        kind = (hf_values.get("gptlab") or {}).get("tokenizer") or _guess_tokenizer_kind(directory, hf_values)
    if kind == "bpe":
        return _bpe_tokenizer(directory / "tokenizer.json")
    return build_tokenizer(kind)


def _guess_tokenizer_kind(directory: Path, hf_values: Mapping[str, Any]) -> str:
    from gptlab.tokenizer import EOT

    vocab = directory / "vocab.json"
    if vocab.is_file():
        try:
            entries = json.loads(vocab.read_text())
        except ValueError:
            entries = {}
        if len(entries) == 50257 and entries.get(EOT) == 50256:
            return "gpt2"
    if (directory / "tokenizer.json").is_file():
        return "bpe"
    if not vocab.is_file() and hf_values.get("vocab_size", 50257) == 50257:
        return "gpt2"
    raise GptlabError(
        f"cannot tell which tokenizer the model in {directory} uses; pass --tokenizer gpt2, bpe (its tokenizer.json) or byte"
    )


def _bpe_tokenizer(path: Path):
    """A byte-level BPE tokenizer.json as gptlab's `bpe` kind; other tokenizer models are refused."""
    from tokenizers import Tokenizer as HFTokenizer

    from gptlab.tokenizer import BPETokenizer

    if not path.is_file():
        raise GptlabError(f"{path} not found; a bpe tokenizer is read from the directory's tokenizer.json")
    try:
        spec = json.loads(path.read_text())
        pre = spec.get("pre_tokenizer") or {}
        kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
        byte_level = spec["model"]["type"] == "BPE" and "ByteLevel" in kinds
    except (ValueError, KeyError, TypeError, AttributeError):
        raise GptlabError(f"{path} is not a tokenizers tokenizer.json") from None
    if not byte_level:
        raise GptlabError(f"{path} is not a byte-level BPE; gptlab's tokenizers are gpt2, byte-level bpe and byte")
    return BPETokenizer(HFTokenizer.from_file(os.fspath(path)))


def export_tokenizer(tokenizer, saved_dir: Path, out_dir: Path, context_length: int, pad: bool = False) -> None:
    """Write a gptlab tokenizer in transformers' format: GPT-2's own vocab.json and merges.txt, or a
    tokenizer.json (the trained BPE's, or one that maps each byte to its own id for `byte`). `pad` makes
    end-of-text its padding token too, as a classifier's config.json says (batches of texts need one)."""
    from gptlab.tokenizer import EOT

    if tokenizer.kind == "gpt2":
        from gptlab.download import dataset_files

        encoder, merges = dataset_files("gpt2")  # OpenAI's encoder.json and vocab.bpe are transformers' files
        shutil.copyfile(encoder, out_dir / "vocab.json")
        shutil.copyfile(merges, out_dir / "merges.txt")
    elif tokenizer.kind == "bpe":
        shutil.copyfile(saved_dir / "tokenizer.json", out_dir / "tokenizer.json")
    else:
        _byte_tokenizer_json().save(os.fspath(out_dir / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, **({"pad_token": EOT} if pad else {})}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer" if tokenizer.kind == "gpt2" else "PreTrainedTokenizerFast",
            "model_max_length": context_length,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            **special,
        },
    )
    _write_json(out_dir / "special_tokens_map.json", special)


def _byte_tokenizer_json():
    """gptlab's byte tokenizer as a tokenizers BPE without merges: byte b is id b, <|endoftext|> is 256."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from gptlab.tokenizer import EOT, _bytes_to_unicode

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


# ---------------------------------------------------------------- import


def import_hf(
    directory: str | Path,
    run_dir: str | Path,
    tokenizer: str = "auto",
    force: bool = False,
    dropout: float | None = None,
) -> Path:
    """Turn a local transformers GPT-2 directory into a gptlab run directory; returns the run directory.

    A GPT2ForSequenceClassification becomes a classification run with its labels. `dropout` replaces
    the config's (`resid_pdrop`), which later finetuning inherits. Tensors are converted and written
    one at a time, so memory stays near the largest tensor.
    """
    from gptlab.checkpoint import WEIGHTS_FILE, save_checkpoint, write_run_config
    from gptlab.config import config_to_dict

    directory, run_dir = Path(directory), Path(run_dir)
    values = read_hf_config(directory)
    _refuse_overlap(directory, run_dir)
    _refuse_existing(run_dir, force, *_RUN)
    config = gpt_config_from_hf(values, str(directory / HF_CONFIG))
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    tok = import_tokenizer(directory, values, tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise GptlabError(
            f"the {tok.kind} tokenizer has {tok.vocab_size} ids but the model in {directory} only {config.vocab_size}; "
            "pass the --tokenizer it was trained with"
        )
    checkpoint = HFCheckpoint(directory)
    shapes = checkpoint.shapes()
    labels = _hf_labels(values, shapes, checkpoint.source)
    head = "score.weight" if labels else "lm_head.weight"
    plan = conversion_plan(shapes, config, checkpoint.source, head)
    config = _drop_zero_biases(config, plan, checkpoint, values.get("gptlab") or {})
    plan = conversion_plan(shapes, config, checkpoint.source, head)
    run_config: dict[str, Any] = {"task": "pretrain", "model": config_to_dict(config)}
    if (values.get("gptlab") or {}).get("template"):  # a gptlab export of an instruction-tuned run
        run_config["template"] = values["gptlab"]["template"]
    if labels:
        run_config.update(task="classify", classify={"labels": labels, "pooling": "last"})
    with _new_directory(run_dir, force, *_RUN) as building:
        write_run_config(building, run_config)
        tok.save(building / "tokenizer")
        # save_checkpoint writes the trainer state and the `latest` pointer; the weights are streamed over
        # its (empty) weights file, so they are never all in memory.
        folder = save_checkpoint(building, 0, {}, {"step": 0, "imported_from": str(directory.resolve())})
        write_safetensors(folder / WEIGHTS_FILE, {name: checkpoint.lazy(key, t) for name, key, t in plan})
    return run_dir


def _hf_labels(values: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str) -> list[str] | None:
    """The label names, in id order, of a GPT2ForSequenceClassification; None for a language model."""
    if "GPT2ForSequenceClassification" not in (values.get("architectures") or []):
        return None
    id2label = values.get("id2label") or {}
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(len(id2label) or 2)]
    rows = shapes.get("score.weight", (len(labels),))[0]
    if rows != len(labels):
        raise GptlabError(
            f"tensor 'score.weight' in {source} has {rows} rows but config.json names {len(labels)} labels"
        )
    return labels


def _drop_zero_biases(config: GPTConfig, plan, checkpoint: HFCheckpoint, recorded: Mapping[str, Any]) -> GPTConfig:
    """Give back `qkv_bias`/`bias` False to the export of a model trained without those biases.

    The export wrote them as zeros (GPT-2 always has them); they are dropped only while still all zero.
    """
    for name in ("qkv_bias", "bias"):
        if recorded.get(name, True):
            continue
        reduced = dataclasses.replace(config, **{name: False})
        kept = {ours for ours, _, _ in name_pairs(reduced)} | {"lm_head.weight"}
        if not any(checkpoint.load(key).any() for ours, key, _ in plan if ours not in kept):
            config = reduced
    return config


def hf_endpoint() -> str:
    """Where GPT-2's weights are downloaded from: GPTLAB_HF_ENDPOINT, default https://huggingface.co."""
    return os.environ.get("GPTLAB_HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def gpt2_urls(size: str) -> dict[str, str]:
    """The published config.json and model.safetensors of a GPT-2 size, by file name."""
    if size not in GPT2_SIZES:
        raise GptlabError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    return {name: f"{hf_endpoint()}/openai-community/{size}/resolve/main/{name}" for name in (HF_CONFIG, HF_WEIGHTS)}


def fetch_gpt2(size: str, progress: bool = True) -> Path:
    """The folder holding GPT-2's published files of `size`: `hf/openai-community/SIZE/` under
    GPTLAB_DATA_DIR when it is there, else in the cache, downloaded (resumed, verified) if missing."""
    from gptlab.download import cache_dir, data_dirs, download_file

    urls = gpt2_urls(size)
    relative = Path("hf") / "openai-community" / size
    for folder in data_dirs():
        if all((folder / relative / name).is_file() for name in urls):
            return folder / relative
    dest = cache_dir() / relative
    for name, url in urls.items():
        expected_size, sha256 = GPT2_KNOWN_FILES.get((size, name), (None, None))
        try:
            download_file(url, dest / name, sha256, expected_size, progress)
        except GptlabError as exc:
            by_hand = ", ".join(f"{u} to {dest / n}" for n, u in urls.items())
            raise GptlabError(f"{exc}; download {by_hand} (or put them in {relative}/ under GPTLAB_DATA_DIR)") from None
    return dest


def import_gpt2(
    size: str, run_dir: str | Path, force: bool = False, progress: bool = True, dropout: float | None = None
) -> Path:
    """Download GPT-2's published weights of `size` (once, into the cache) and make a gptlab run of them."""
    from gptlab.download import dataset_files

    _refuse_existing(Path(run_dir), force, *_RUN)
    dataset_files("gpt2")  # the tokenizer files, so the run works offline from now on
    folder = fetch_gpt2(size, progress)
    try:
        return import_hf(folder, run_dir, tokenizer="gpt2", force=force, dropout=dropout)
    except GptlabError as exc:  # only the weights' checksum is published: a bad config.json stays cached
        raise GptlabError(f"{exc}; if a download went wrong, delete {folder} and import again") from None


# ---------------------------------------------------------------- export


def lazy_hf_tensors(
    state: Mapping[str, torch.Tensor], config: GPTConfig, head: str = "lm_head.weight"
) -> dict[str, LazyTensor]:
    """transformers' tensors for a gptlab state dict, each transposed only when loaded.

    Biases the config leaves out are zeros here: GPT-2 always has them, and zeros change nothing.
    `head` names the output layer: `lm_head.weight`, or `score.weight` for a classifier.
    """
    shapes = expected_shapes(config)
    dtype = state["token_embedding.weight"].dtype
    tensors = {}
    for ours, theirs, transposed in name_pairs(dataclasses.replace(config, qkv_bias=True, bias=True)):
        tensor = state.get(ours)
        if tensor is None:
            lazy = LazyTensor(shapes[ours], dtype, lambda shape=shapes[ours]: torch.zeros(shape, dtype=dtype))
        else:
            shape = tuple(tensor.shape)[::-1] if transposed else tuple(tensor.shape)
            lazy = LazyTensor(shape, tensor.dtype, lambda t=tensor, tr=transposed: _transposed(t, tr))
        tensors["transformer." + theirs] = lazy
    head_weight = state["lm_head.weight"]
    tensors[head] = LazyTensor(tuple(head_weight.shape), head_weight.dtype, lambda: head_weight.contiguous())
    return tensors


def export_run(run: str | Path, out_dir: str | Path, which: str = "latest", force: bool = False) -> Path:
    """Write a run as a transformers directory (config.json, model.safetensors, generation_config.json,
    the tokenizer) that AutoModelForCausalLM / AutoTokenizer load; returns the directory.

    A classification run becomes a GPT2ForSequenceClassification with its label names; a LoRA run is
    exported with its adapters merged into the weights.
    """
    from gptlab.checkpoint import load_run

    out_dir = Path(out_dir)
    _refuse_overlap(Path(run), out_dir)
    _refuse_existing(out_dir, force, *_EXPORT)
    loaded = load_run(run, which=which)
    _refuse_overlap(loaded.run_dir, out_dir)  # RUN may be one of its checkpoint folders
    model = loaded.model
    if loaded.config.get("lora"):
        from gptlab.lora import merge_lora

        model = merge_lora(model)
    labels = _class_labels(loaded.config)
    config, eot_id = model.config, loaded.tokenizer.eot_id
    tensors = lazy_hf_tensors(model.state_dict(), config, "score.weight" if labels else "lm_head.weight")
    if config.tie_embeddings and not labels:
        del tensors["lm_head.weight"]  # transformers ties it to transformer.wte.weight on loading
    with _new_directory(out_dir, force, *_EXPORT) as building:
        write_safetensors(building / HF_WEIGHTS, tensors)
        template = loaded.config.get("template")  # an instruction-tuned run's prompt format, for `import hf`
        _write_json(building / HF_CONFIG, hf_config(config, eot_id, loaded.tokenizer.kind, labels, template))
        _write_json(
            building / "generation_config.json",
            {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id},
        )
        export_tokenizer(
            loaded.tokenizer, loaded.run_dir / "tokenizer", building, config.context_length, pad=bool(labels)
        )
    return out_dir


def _class_labels(run_config: Mapping[str, Any]) -> list[str] | None:
    """The label names of a classification run, None for any other task."""
    if run_config.get("task") != "classify":
        return None
    section = run_config.get("classify") or {}
    if section.get("pooling", "last") != "last":
        raise GptlabError(
            f"the classifier pools with {section['pooling']!r}; transformers' GPT2ForSequenceClassification reads "
            "the last token only, so only classify.pooling 'last' exports"
        )
    if not section.get("labels"):
        raise GptlabError("the classification run's config.yaml names no labels (classify.labels)")
    return [str(label) for label in section["labels"]]


# ---------------------------------------------------------------- output directories


def _refuse_overlap(source: Path, path: Path) -> None:
    """Refuse a destination that is or holds the directory it is made from: replacing it would delete
    the source (symbolic links are followed). A destination inside the source (`export run run/hf`) is fine."""
    if source.resolve().is_relative_to(path.resolve()):
        raise GptlabError(f"{path} is or holds {source}, which it is made from; write to another directory")


def _refuse_existing(path: Path, force: bool, is_kind: Callable[[Path], bool], kind: str) -> None:
    """Refuse to replace anything but an empty directory, or with `force` one that `is_kind`: a previous
    `kind`. Other folders (a trained run, a home directory given by mistake) are never deleted."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not force:
        raise GptlabError(f"{path} already exists; choose a new directory or pass --force to replace it")
    if not path.is_dir() or not is_kind(path):
        raise GptlabError(
            f"{path} is not {kind}, so --force does not replace it; choose a new directory or remove it yourself"
        )


@contextmanager
def _new_directory(path: Path, force: bool, is_kind: Callable[[Path], bool], kind: str) -> Iterator[Path]:
    """A temporary sibling folder to fill, renamed to `path` only once complete: a failed or killed
    import or export never leaves half a directory behind."""
    path = path.resolve()  # a link to a directory: replace the directory it points to, keep the link
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    ordinary_permissions(building, directory=True)  # the result is an ordinary directory
    try:
        yield building
        _refuse_existing(path, force, is_kind, kind)
        if path.exists():
            shutil.rmtree(path)
        os.replace(building, path)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _write_json(path: Path, values: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n")
