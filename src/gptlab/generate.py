"""Text generation: decoding strategies, the KV-cached decoding loop, batching, stop strings, streaming, chat.

Layers, lowest first:
    sample_next(logits, config)              one token per row from last-position logits (`draw` samples)
    LiveBatch                                rows decoding together, joining and leaving between steps
    decode_steps(model, prompt_ids, config)  every row's next token, step after step
    decode_rows(model, config, take, ended)  rows as they come, a row that ends making room (continuous batching)
    generate_ids(model, prompt_ids, config)  the new token ids of each prompt
    stream(model, tokenizer, prompt, config) the completion as text pieces, valid UTF-8 each
    generate(model, tokenizer, prompts, config) the completion of each prompt
    Chat                                     a conversation in a run's prompt template

Rows of a batch are left-padded to a common length (rows that join later are right-aligned with the
others in the KV cache); the attention mask and per-row positions make each row's result the same as
generating it alone. When a row outgrows the context length, its
window slides: it keeps its most recent tokens and the cache is recomputed from them.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import functools
import hashlib
import math
import numbers
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from gptlab import machine
from gptlab.config import GenerationConfig
from gptlab.errors import GptlabError


class GenerationWarning(UserWarning):
    """Generation went on after changing the input, e.g. truncating a prompt longer than the context."""


# ---------------------------------------------------------------- decoding strategies


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen (B, V bool) less likely: positive logits divided, negative multiplied (CTRL)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (B, V) with all but each row's k largest set to -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


# How many of the most likely tokens are sorted to look for a nucleus, in turn, before all of them.
NUCLEUS_SEARCH_TOKENS = (256, 4096)


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits with -inf outside each row's nucleus: the fewest most likely tokens whose probability
    reaches p, and any tied with the least likely of them.

    Sorting all of GPT-2's 50,257 probabilities takes 3.7-4.1 ms on a CPU, longer than the rest of a
    decoding step, so the nucleus is looked for among each row's 256 most likely tokens first (0.2 ms),
    then 4,096 (0.5 ms); only when some row's nucleus is larger still is everything sorted.
    """
    probs = logits.softmax(dim=-1)
    vocab = probs.shape[-1]
    for k in dict.fromkeys([*(min(n, vocab) for n in NUCLEUS_SEARCH_TOKENS), vocab]):
        top = probs.topk(k, dim=-1).values if k < vocab else probs.sort(dim=-1, descending=True).values
        kept = top.cumsum(dim=-1) - top < p  # the mass listed before a token has not reached p yet
        if not kept.all(dim=-1).any():  # every row's nucleus ends among these tokens
            break
    smallest_kept = top.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(probs < smallest_kept, float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Logits with -inf for tokens less likely than `min_p` times the row's most likely token."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def is_greedy(config: GenerationConfig) -> bool:
    """Whether the config decodes greedily: temperature 0, or so small that fp32 would read it as 0."""
    return config.temperature < torch.finfo(torch.float32).tiny


def sample_next(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token (B,) of each row from last-position logits (B, V) by the config's strategy.

    Order: repetition penalty, then greedy (temperature 0) or temperature, top-k, top-p, min-p, sampling.
    """
    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, seen, config.repetition_penalty)
    if is_greedy(config):
        return logits.argmax(dim=-1)
    # Shifted to a row maximum of 0 first: softmax does not change, and a tiny temperature then makes the
    # others -inf (greedy-like) instead of overflowing every logit to inf and the probabilities to NaN.
    # (Below fp32's smallest normal number it is greedy itself, above.)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_k is not None:
        logits = keep_top_k(logits, config.top_k)
    if config.top_p < 1.0:
        logits = keep_top_p(logits, config.top_p)
    if config.min_p > 0:
        logits = keep_min_p(logits, config.min_p)
    return draw(logits.softmax(dim=-1), generator)


# The fields of a config that `sample_next` reads: each row of a batch may have its own (`sample_rows`).
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_settings(config: GenerationConfig) -> tuple:
    """A config's sampling fields' values: rows that agree on them are sampled together."""
    return tuple(getattr(config, name) for name in SAMPLING_FIELDS)


def sample_rows(
    logits: torch.Tensor,
    settings: Sequence[GenerationConfig],
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`sample_next` for rows with settings of their own (`settings[i]` for row i): each group of rows
    that share their sampling settings is sampled as one batch, in the order the groups first appear."""
    return by_setting_groups(
        settings,
        seen,
        logits.device,
        lambda config, rows, group_seen: sample_next(_rows_of(logits, rows), config, group_seen, generator),
    )


def by_setting_groups(
    settings: Sequence[GenerationConfig],
    seen: torch.Tensor | None,
    device: torch.device,
    pick: Callable[[GenerationConfig, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """The next token (B,) of each row, each group of rows that share their sampling settings picked
    together, in the order the groups first appear: `pick(config, rows, their seen)`, `rows` an index
    tensor, or None when every row shares the settings."""
    groups: dict[tuple, tuple[GenerationConfig, list[int]]] = {}
    for i, config in enumerate(settings):
        groups.setdefault(sampling_settings(config), (config, []))[1].append(i)
    if len(groups) == 1:
        return pick(settings[0], None, seen)
    tokens = torch.empty(len(settings), dtype=torch.long, device=device)
    for config, rows in groups.values():
        index = torch.tensor(rows, device=device)
        tokens[index] = pick(config, index, _rows_of(seen, index))
    return tokens


def _rows_of(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor[rows]`; the whole tensor when `rows` is None, None when it is."""
    return tensor if tensor is None or rows is None else tensor[rows]


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index (B,) from each row's probabilities (B, V), which need not sum to exactly 1.

    On a CPU, `torch.multinomial` draws a random number for every entry of the row, 1.2 ms for GPT-2's
    50,257 tokens, as long as the rest of a decoding step. Here a CPU inverts the cumulative
    distribution instead: one uniform number a row, the cumulative sum in float64 (so that rounding
    moves no token's share by more than about 1e-12), and a binary search, about 0.1 ms. An entry of
    probability 0 is never drawn: the search finds the first cumulative sum above the number, which
    only a token with a share can be.
    """
    if probs.device.type != "cpu":  # GPUs draw all those numbers in parallel (and MPS has no float64)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    cumulative = probs.double().cumsum(dim=-1)
    total = cumulative[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all() and (probs >= 0).all()):
        raise GptlabError(
            "cannot sample: a row of probabilities is NaN, infinite, negative or all zero "
            "(the model's logits are not finite: check the checkpoint, or decode greedily to see where it breaks)"
        )
    uniform = torch.rand(total.shape, dtype=torch.float64, generator=generator) * total
    # rand is below 1, but the product can round up to the total, past the last token with a share.
    uniform = torch.minimum(uniform, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, uniform, right=True).squeeze(1)


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """A random generator seeded from the config, or None to use torch's global one."""
    if config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


# ---------------------------------------------------------------- the decoding loop


def sliding_keep(context_length: int) -> int:
    """Tokens a row keeps when its window slides: the most recent three quarters of the context."""
    return max(1, context_length - context_length // 4)


def _slide_windows(rows: list[list[int]], starts: list[int], context_length: int) -> bool:
    """Move the window start of each row that outgrew the context; True if any moved."""
    slid = False
    for i, row in enumerate(rows):
        if len(row) - starts[i] > context_length:
            starts[i] = len(row) - sliding_keep(context_length)
            slid = True
    return slid


def _left_padded(windows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (B, P) left-padded with 0 and the attention mask (None when no row is padded)."""
    width = max(len(w) for w in windows)
    ids = torch.tensor([[0] * (width - len(w)) + w for w in windows], device=device)
    if all(len(w) == width for w in windows):
        return ids, None
    mask = torch.tensor([[0] * (width - len(w)) + [1] * len(w) for w in windows], device=device)
    return ids, mask


# lm_head module -> (its weight's identity and version, fingerprint, derived copy); see `_derived`.
# groups -> linear module -> its weight as (groups, in, n) (`_columns`), as `_derived` keeps them
_TRANSPOSED_WEIGHTS: dict[int, weakref.WeakKeyDictionary] = {}
_SCREENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's head when decoding may map hidden states through it directly; None to use `forward`."""
    from gptlab.distributed import is_sharded

    head = getattr(model, "lm_head", None)
    # FSDP gathers a sharded model's weights in the hooks of its forward, which hidden_states skips.
    if head is None or not hasattr(model, "hidden_states") or is_sharded(model):
        return None
    return head


def _plain_cpu_weight(head: torch.nn.Module | None) -> torch.Tensor | None:
    """The weight of a bias-free linear head on the CPU, which decoding may replace by a derived copy."""
    from gptlab.model import plain_linear

    if not plain_linear(head) or head.bias is not None or head.weight.device.type != "cpu":
        return None
    return head.weight


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A checksum of every entry, r_rows . (W r_columns) in float64 for fixed random vectors r: a changed
    entry, row or column changes it, however it was changed. Fused optimizers (AdamW's fused kernel)
    update weights in place without bumping their version counter, and `.data` edits never bump it.
    One pass over the weight, about the cost of one decoding step's head, once per generation."""
    probe_rows, probe_columns = _probes(*weight.shape, weight.device)
    weight = weight.detach()
    if weight.dtype not in (torch.float32, torch.float64):  # summed in fp32, not in a coarser dtype
        weight = weight.float()
    return torch.dot(torch.mv(weight, probe_columns.to(weight.dtype)).double(), probe_rows)


@functools.lru_cache(maxsize=8)
def _probes(rows: int, columns: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random weights in [1, 2) for `_fingerprint`: float64 (rows,) and fp32 (columns,)."""
    generator = torch.Generator().manual_seed(rows * 100_003 + columns)
    probe_rows = torch.rand(rows, generator=generator, dtype=torch.float64).add_(1)
    return probe_rows.to(device), torch.rand(columns, generator=generator).add_(1).to(device)


def _derived(cache: weakref.WeakKeyDictionary, head: torch.nn.Module, make: Callable):
    """`make(weight)` for the head's current weight, made again when the weight changed and kept while it lives.

    A change is a new tensor, a new version (in-place updates bump it) or, for updates that do not
    (fused optimizers, `.data` edits), a different checksum of every entry (`_fingerprint`)."""
    weight = head.weight
    key = (weight.data_ptr(), weight.dtype, weight.shape, 0 if weight.is_inference() else weight._version)
    cached = cache.get(head)  # (key, fingerprint, derived copy)
    with torch.no_grad():
        fingerprint = _fingerprint(weight)
        if cached is None or cached[0] != key or not torch.equal(cached[1], fingerprint):
            cached = cache[head] = (key, fingerprint, make(weight.detach()))
    return cached[2]


def decoding_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from last hidden states (B, C) to logits (B, V) used while decoding; None to use `forward`.

    On the CPU a few vectors times the head stored as (C, V) stream memory about twice as fast as
    F.linear's (V, C) layout (5.8 against 11.3 ms for GPT-2's 50257 x 384 head on one core), and the
    head is most of a decoding step's work on small models; such a product of one row runs on one
    thread, and split into groups of columns, one a thread, it is faster again (2.8 -> 1.6 ms on a Zen 5
    EPYC's 2 threads; 8 rows 6.4 -> 4.2 ms). So a plain bias-free head gets a copy in the layout this
    machine measured fastest (`_groups_choice`, `_columns`), made again when the weight changes
    (`_derived`); other heads, and a head that `F.linear` serves as fast, are used as they are.
    """
    head = _plain_head(model)
    weight = _plain_cpu_weight(head)
    if weight is None:
        return head
    return _grouped_product(weight, head) or head


def _grouped_product(weight: torch.Tensor, module: torch.nn.Module | None = None):
    """x -> x W^T through W's columns in the groups this machine multiplies fastest (a copy kept for
    `module` while it lives, else a fresh one); None where `F.linear` on W is as fast."""
    from gptlab.model import _project

    groups = _groups_choice([weight])["one_row_groups"]
    if groups == 0:
        return None
    if module is None:
        columns = _columns(weight.detach(), groups)
    else:
        columns = _derived(
            _TRANSPOSED_WEIGHTS.setdefault(groups, weakref.WeakKeyDictionary()),
            module,
            functools.partial(_columns, groups=groups),
        )
    return lambda hidden: _project(hidden, weight, None, columns)


# The most memory the grouped copies of the blocks' weights may take (`block_columns`): GPT-2 small's
# take 340 MB, gpt2-medium's 1.2 GB, which a laptop would rather keep.
BLOCK_COLUMNS_MAX_BYTES = 512 * 2**20


def block_columns(model: torch.nn.Module) -> BlockColumns | None:
    """For decoding steps (`model.DecodeStep`): each block's four projection weights W (out, in) stored
    as W^T's columns in k groups, (k, in, n), where this CPU multiplies a vector by them faster than by
    W itself (and whether 8 rows are faster so too); else None.

    A decoding step of one row reads every block weight once, and CPUs differ in how they stream it:
    on a Zen 5 EPYC bpe-mini's 24 products of one row take 2.7-2.9 ms with `F.linear` on the (out, in)
    weights (on one thread, whatever the thread count), 1.7-2.1 ms stored (in, out), and 1.2-1.5 ms as
    (2, in, out / 2) groups, which `bmm` gives one thread each; 8 rows 3.2 -> 2.4 ms (docs/benchmarks.md).
    So the layout is measured once per machine, thread count and set of shapes (`_groups_choice`, kept
    in the cache); the copies are made again when a weight changes (`_derived`), for fp32 weights on the
    CPU up to `BLOCK_COLUMNS_MAX_BYTES`."""
    from gptlab.model import plain_linear

    linears = [[b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj] for b in getattr(model, "blocks", ())]
    flat = [linear for layer in linears for linear in layer]
    if not flat or not all(plain_linear(linear) for linear in flat):
        return None
    weights = [linear.weight for linear in flat]
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return None
    if sum(w.numel() * w.element_size() for w in weights) > BLOCK_COLUMNS_MAX_BYTES:
        return None
    choice = _groups_choice(weights)
    groups = choice["one_row_groups"]
    if groups == 0:
        return None
    copies = _TRANSPOSED_WEIGHTS.setdefault(groups, weakref.WeakKeyDictionary())
    make = functools.partial(_columns, groups=groups)
    layers = [[_derived(copies, linear, make) for linear in layer] for layer in linears]
    return BlockColumns(layers, choice["rows_too"])


class BlockColumns(NamedTuple):
    """The blocks' weights for decoding steps (`block_columns`): each block's four copies, W^T's columns
    in groups (`_columns`), and whether steps of several rows take them too (one row always does)."""

    layers: list[list[torch.Tensor]]
    rows_too: bool


def _columns(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """W (out, in) as (k, in, n): W^T's columns in k groups of n = ceil(out / k) neighbours, the last
    padded with zero columns; a row times group g gives outputs g * n onwards."""
    out, width = weight.shape
    n = -(-out // groups)
    if n * groups != out:
        weight = torch.cat([weight, weight.new_zeros(n * groups - out, width)])
    return weight.t().reshape(width, groups, n).transpose(0, 1).contiguous()


def _groups_choice(weights: list[torch.Tensor]) -> dict:
    """This machine's `_measure_groups` for these weights' shapes, measured once per machine, thread
    count and set of shapes, and kept in the cache: "one_row_groups", in how many groups of columns one
    row multiplies them fastest (k, one a thread; 0 where `F.linear` on the weights is as fast, within
    5%), and "rows_too", whether 8 rows are faster (by 5%) in those groups as well."""
    shapes = ",".join(f"{w.shape[0]}x{w.shape[1]}" for w in weights)
    key = f"{machine.machine_key(weights[0].device)}|{weights[0].dtype} weights {hashlib.sha256(shapes.encode()).hexdigest()[:16]}"
    return machine.remembered("decoding.json", key, lambda: _measure_groups(weights), _valid_groups_choice)


def _measure_groups(weights: list[torch.Tensor], repeats: int = 15) -> dict:
    """Times of one row through the weights as they are (`F.linear`) and in 1 and (with more threads) k
    groups of columns; then of 8 rows through `F.linear` and the groups one row takes, if any."""
    from gptlab.model import _project

    generator = torch.Generator().manual_seed(3)
    inputs = {w.shape[1]: torch.randn(8, w.shape[1], generator=generator).to(w.dtype) for w in weights}
    columns = {0: [None] * len(weights)}
    for groups in sorted({1, torch.get_num_threads()}):
        columns[groups] = [_columns(w.detach(), groups) for w in weights]

    def through(groups, rows):
        for weight, grouped in zip(weights, columns[groups], strict=True):
            _project(inputs[weight.shape[1]][:rows], weight, None, grouped)

    def label(groups):
        return "F.linear" if groups == 0 else f"{groups} groups"

    with torch.no_grad():
        one_row = machine.fastest({k: functools.partial(through, k, 1) for k in columns}, repeats)[1]
        fastest = min(one_row, key=one_row.get)
        groups = fastest if one_row[fastest] < 0.95 * one_row[0] else 0
        rows = machine.fastest({k: functools.partial(through, k, 8) for k in {0, groups}}, repeats)[1]
    return {
        "one_row_groups": groups,
        "rows_too": groups > 0 and rows[groups] < 0.95 * rows[0],
        "milliseconds": {
            "one row": {label(k): round(t * 1e3, 4) for k, t in one_row.items()},
            "8 rows": {label(k): round(t * 1e3, 4) for k, t in rows.items()},
        },
    }


def _valid_groups_choice(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    groups = choice.get("one_row_groups")
    return type(groups) is int and groups >= 0 and isinstance(choice.get("rows_too"), bool)


# A screen leaving more candidates than this per row computes the whole head in fp32 instead (a head of
# nearly equal rows, such as a freshly zeroed one, would otherwise gather most of its weight).
SCREEN_MAX_CANDIDATES = 1024
# Rounds of draws a row of plain sampling gets from the screen's proposal before its logits are computed
# in fp32 (each round accepts with a probability of at least exp(-2E / temperature); see `HeadScreen`).
SCREEN_SAMPLING_ROUNDS = 8


class HeadScreen:
    """The next token through a bf16 copy of an fp32 head, chosen exactly as from fp32's logits.

    Decoding a small model is bound by reading its weights from memory, and the head is the largest of
    them (GPT-2's 50,257 x 384 is 77 MB in fp32, two thirds of bpe-mini's weights). On a CPU with bf16
    units the head is read in bf16, half the bytes. Each bf16 logit l' is within a bound E of the fp32
    one l, E following from how far the weights, the hidden state and the result move when rounded to
    bf16. What fp32 would choose then needs only a few logits in fp32, computed from the fp32 weight rows:
    - greedy: a token whose l' is more than 2E below the row's largest cannot have the largest l; the
      first of the largest among the rest wins, as in `argmax`;
    - top-k and min-p: a token more than 2E below the k-th largest l' (or the min-p threshold on l') is
      outside fp32's selection; the rest get fp32 logits, and `sample_next` draws among them as it would
      from the whole fp32 row: the same token for the same random number, up to the rounding of sums;
    - plain sampling at temperature T: a token is drawn from softmax(l' / T) and kept with probability
      exp((l - l' - E) / T) <= 1, else drawn again (rejection sampling). Kept tokens follow softmax(l / T)
      exactly; each draw is kept with a probability of at least exp(-2E / T). A row still without a token
      after `SCREEN_SAMPLING_ROUNDS` rounds takes its fp32 logits. The random numbers differ from fp32's
      path (two a draw), so a seed gives other tokens than on a CPU without bf16 units, from the same
      distribution.
    A repetition penalty p applies to l' and l alike, and E grows by max(p, 1/p) (`_ScreenRows`).
    Nucleus (top-p) sampling needs every logit (`screens`).
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (V, C) fp32
        self.low = weight.to(torch.bfloat16)
        rounded = self.low.float()
        weight_error = torch.linalg.vector_norm(weight - rounded, dim=1).max().item()  # max |w - bf16(w)|
        largest_row = torch.linalg.vector_norm(rounded, dim=1).max().item()  # max |bf16(w)|
        width = weight.shape[1]
        # E = |h| (max |w - bf16(w)| + max |bf16(w)| / 64) + a term for subnormal numbers, by
        # Cauchy-Schwarz, with u = 2^-8 the rounding of bf16: rounding h moves each logit by up to
        # u |h| max |bf16(w)|, rounding w by |h| max |w - bf16(w)|; the products of bf16 numbers are
        # exact in fp32, their sum over C <= 2^14 terms errs by at most 2^-10 |h| max |bf16(w)|, and
        # rounding the result to bf16 by u of it: less than 2^-6 |h| max |bf16(w)| together. Below the
        # normal range (2^-126) the error is absolute, not relative, and CPU kernels may flush such
        # numbers to zero (this CPU's bf16 matrix products do, its matrix-vector product does not): up
        # to 2^-126 for each entry of h, for each product and for the result.
        self.bound_per_norm = weight_error + largest_row / 64
        self.subnormal_error = (largest_row * math.sqrt(width) + width + 1) * 2.0**-126
        # Which `_BF16_PRODUCTS` kernel serves one row and more rows, and whether the screen beats the
        # fp32 head at each: what this CPU does fastest, measured by `measure` (the first kernels until then).
        self.one_row_product, self.rows_product = "vector", "columns"
        self.pays_for = {"one row": True, "rows": True}
        self.milliseconds: dict | None = None

    def measure(self, repeats: int = 15) -> dict:
        """Time this CPU's bf16 kernels and the screen against the fp32 head, for one row and for 8; keep
        the fastest kernels and where the screen pays, and return them (`choice`).

        Which is fastest differs between CPUs by up to 2x, and a screen can lose to the fp32 head outright
        (docs/benchmarks.md): on an AMX Xeon the matrix-vector kernel serves one row 1.7x faster than a
        product, on a Zen 5 EPYC the product is 1.8x faster than it, and on a Zen 4 EPYC (bf16 units of
        half width) the fp32 head decodes 15% faster than the screen. 0.3-0.6 s for GPT-2's head, once
        per machine and head shape (`head_screen` keeps the choice in the cache)."""
        fp32_head = _grouped_product(self.weight) or functools.partial(torch.nn.functional.linear, weight=self.weight)
        probes = torch.randn(8, self.weight.shape[1], generator=torch.Generator().manual_seed(1))
        milliseconds = {}
        for rows, attribute in ((probes[:1], "one_row_product"), (probes, "rows_product")):
            low = rows.to(torch.bfloat16)
            kernels = {
                name: functools.partial(product, self.low, low, rows)
                for name, product in _BF16_PRODUCTS.items()
                if len(rows) == 1 or name != "vector"
            }
            fastest, kernel_times = machine.fastest(kernels, repeats)
            setattr(self, attribute, fastest)
            screen_or_head = {
                "screen": functools.partial(self.greedy, rows),
                "fp32 head": functools.partial(_fp32_argmax, rows, fp32_head),
            }
            times = machine.fastest(screen_or_head, repeats)[1]
            # a margin for the noise of timing: where the two are close, the fp32 head (no second path)
            count = "one row" if len(rows) == 1 else "rows"
            self.pays_for[count] = times["screen"] < 0.95 * times["fp32 head"]
            milliseconds[count] = {name: round(t * 1e3, 4) for name, t in {**kernel_times, **times}.items()}
        return {**self.choice(), "milliseconds": milliseconds}  # the times for people reading the cache

    def choice(self) -> dict:
        """The kernels and where the screen pays, as JSON keeps them (`measure`, `adopt`)."""
        return {"one_row_product": self.one_row_product, "rows_product": self.rows_product, "pays_for": self.pays_for}

    def adopt(self, choice: dict) -> None:
        """Take a `choice` measured before on this machine."""
        self.one_row_product, self.rows_product = choice["one_row_product"], choice["rows_product"]
        self.pays_for = dict(choice["pays_for"])
        self.milliseconds = choice.get("milliseconds")  # what `measure` timed, if it did

    @staticmethod
    def valid_choice(choice: object) -> bool:
        """Whether `choice` (from the cache's file) names kernels and row counts this version knows."""
        return (
            isinstance(choice, dict)
            and choice.get("one_row_product") in _BF16_PRODUCTS
            and choice.get("rows_product") in set(_BF16_PRODUCTS) - {"vector"}
            and isinstance(choice.get("pays_for"), dict)
            and set(choice["pays_for"]) == {"one row", "rows"}
            and all(isinstance(pays, bool) for pays in choice["pays_for"].values())
        )

    def pays(self, rows: int) -> bool:
        """Whether the screen decodes `rows` rows faster than the fp32 head on this CPU (`measure`)."""
        return self.pays_for["one row" if rows == 1 else "rows"]

    def approximate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bf16 logits (B, V), converted to fp32, and the bound E (B,) of their distance from fp32's."""
        low = hidden.to(torch.bfloat16)
        product = self.one_row_product if len(low) == 1 else self.rows_product
        logits = _BF16_PRODUCTS[product](self.low, low, hidden)
        # |h| in float64: its squares underflow in fp32 once every entry is below about 1e-23.
        norm = torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float64)
        return logits, (norm * self.bound_per_norm + self.subnormal_error).float()

    def next_tokens(
        self,
        hidden: torch.Tensor,
        settings: Sequence[GenerationConfig],
        generator: torch.Generator | None = None,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The next token (B,) of each row from its last hidden state (B, C), row i decoded by `settings[i]`
        (each `screens`), as `sample_rows` would from fp32's logits (`seen`: (B, V) the tokens each row
        holds, for the repetition penalty)."""
        approx, bound = self.approximate(hidden)
        # A state not finite, or bf16 overflowing below fp32's largest: fp32's logits. One sum finds an inf
        # or NaN 10x faster than `isfinite` (0.05 against 0.5 ms for 8 rows of GPT-2's vocabulary); finite
        # logits whose sum overflows take fp32's logits too, which is never wrong, only slower.
        if not math.isfinite(approx.sum().item()):
            return sample_rows(hidden @ self.weight.t(), settings, seen, generator)

        def pick(config, rows, group_seen):
            group = _ScreenRows(self.weight, *(_rows_of(t, rows) for t in (hidden, approx, bound)), group_seen, config)
            return self._by(config, group, generator)

        return by_setting_groups(settings, seen, hidden.device, pick)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy next token (B,) of each row from its last hidden state (B, C)."""
        return self.next_tokens(hidden, [GenerationConfig(temperature=0.0)] * len(hidden))

    def _by(self, config: GenerationConfig, group: _ScreenRows, generator) -> torch.Tensor:
        if is_greedy(config):
            return self._greedy(group)
        if config.top_k is None and config.min_p == 0:
            return self._rejection_sample(group, config, generator)
        return self._selection_sample(group, config, generator)

    def _greedy(self, group: _ScreenRows) -> torch.Tensor:
        approx, bound = group.approx, group.bound
        batch = approx.shape[0]
        if batch == 1:  # one row: 1-d reductions and search, about 60 us faster than over a (1, V) matrix
            logits = approx[0]
            vocab_ids = (logits >= logits.max() - 2 * bound).nonzero()[:, 0]
            if 0 < len(vocab_ids) <= SCREEN_MAX_CANDIDATES:  # argmax picks the first of ties, as fp32's would
                return vocab_ids[group.exact(torch.zeros_like(vocab_ids), vocab_ids).argmax()].view(1)
        else:
            rows, vocab_ids = (approx >= (approx.amax(dim=1) - 2 * bound)[:, None]).nonzero(as_tuple=True)
            if vocab_ids.numel() <= SCREEN_MAX_CANDIDATES * batch:
                exact = group.exact(rows, vocab_ids)
                best = exact.new_full((batch,), float("-inf")).scatter_reduce(0, rows, exact, "amax")
                winners = exact == best[rows]
                absent = approx.shape[1]
                tokens = rows.new_full((batch,), absent).scatter_reduce(0, rows[winners], vocab_ids[winners], "amin")
                if not bool((tokens == absent).any()):  # a row without candidates has NaN or inf in it
                    return tokens
        return group.full().argmax(dim=-1)  # too many candidates, or a state not finite

    def _selection_sample(self, group: _ScreenRows, config: GenerationConfig, generator) -> torch.Tensor:
        """Top-k and min-p: every token fp32 may keep gets its fp32 logit, the others -inf."""
        approx, bound = group.approx, group.bound
        lowest = torch.full_like(bound, float("-inf"))
        if config.top_k is not None:
            lowest = torch.topk(approx, min(config.top_k, approx.shape[1]), dim=1).values[:, -1]
        if config.min_p > 0:  # p >= min_p * p_max is l >= l_max + T ln(min_p)
            lowest = torch.maximum(lowest, approx.amax(dim=1) + config.temperature * math.log(config.min_p))
        rows, vocab_ids = (approx >= (lowest - 2 * bound)[:, None]).nonzero(as_tuple=True)
        batch = approx.shape[0]
        if vocab_ids.numel() > SCREEN_MAX_CANDIDATES * batch or not bool(torch.isfinite(lowest).all()):
            return sample_next(group.full(), config, None, generator)  # too many, or not finite
        # Each row's candidates, in vocabulary order, packed to the left of a (B, most candidates) matrix
        # padded with -inf: the draw's cumulative sums are those of the whole row with 0 for every other
        # token, so the same random number picks the same token.
        counts = torch.bincount(rows, minlength=batch)
        column = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]
        logits = approx.new_full((batch, int(counts.max())), float("-inf"))
        logits[rows, column] = group.exact(rows, vocab_ids)
        ids = vocab_ids.new_zeros(logits.shape)
        ids[rows, column] = vocab_ids
        return ids.gather(1, sample_next(logits, config, None, generator)[:, None])[:, 0]

    def _rejection_sample(self, group: _ScreenRows, config: GenerationConfig, generator) -> torch.Tensor:
        """Plain sampling: draws from the bf16 logits, each kept with probability exp((l - l' - E) / T)."""
        approx, bound, temperature = group.approx, group.bound, config.temperature
        proposal = ((approx - approx.amax(dim=1, keepdim=True)) / temperature).softmax(dim=1)
        tokens = torch.empty(len(approx), dtype=torch.long)
        pending = torch.arange(len(approx))
        for _ in range(SCREEN_SAMPLING_ROUNDS):
            drawn = draw(proposal[pending], generator)
            exact = group.exact(pending, drawn)
            # log u < (l - l' - E) / T, for u uniform in (0, 1]: probability exp((l - l' - E) / T)
            uniform = 1 - torch.rand(len(pending), generator=generator)
            kept = uniform.log() * temperature < exact - approx[pending, drawn] - bound[pending]
            tokens[pending[kept]] = drawn[kept]
            pending = pending[~kept]
            if len(pending) == 0:
                return tokens
        tokens[pending] = sample_next(group.full(pending), config, None, generator)
        return tokens

    def holds(self, batch_sizes: Sequence[int] = (1, 4, 16, 64)) -> bool:
        """Whether this CPU's bf16 products stay within the bound (they would not if they summed in bf16),
        for the batch sizes decoding uses (one row takes a matrix-vector kernel, more rows others)."""
        if self.weight.shape[1] > 2**14:  # the bound's sum term assumes C <= 2^14
            return False
        probes = torch.randn(max(batch_sizes), self.weight.shape[1], generator=torch.Generator().manual_seed(0))
        for size in batch_sizes:
            rows = probes[:size]
            approx, bound = self.approximate(rows)
            error = (approx - rows @ self.weight.t()).abs().amax(dim=1)
            if not bool((error <= bound / 2).all()):
                return False
        return True


# The bf16 logits of rows `low` (B, C) through the bf16 head (V, C), as fp32 (B, V) (`hidden`: the rows in
# fp32, whose dtype the result takes). Each kernel reads the weight row by row, as CPU kernels stream
# fastest. "columns" converts the (V, B) product into (B, V) rows at once: reductions and comparisons
# along V are 2-3x faster than down the columns of a (V, B) matrix (1.9 -> 0.7 ms for 8 rows of GPT-2's
# vocabulary, docs/benchmarks.md).
_BF16_PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "vector": lambda weight, low, hidden: torch.mv(weight, low[0])[None].to(hidden.dtype),  # one row only
    "columns": lambda weight, low, hidden: hidden.new_empty((len(low), len(weight))).copy_((weight @ low.t()).t()),
    "rows": lambda weight, low, hidden: torch.nn.functional.linear(low, weight).to(hidden.dtype),
}


def _fp32_argmax(hidden: torch.Tensor, fp32_head: Callable) -> torch.Tensor:
    """Greedy tokens through the fp32 head as `decoding_head` computes it: the screen's rival."""
    return fp32_head(hidden).argmax(dim=-1)


class _ScreenRows:
    """Rows a `HeadScreen` serves with one config: their hidden states, bf16 logits l' and bounds E, with
    the repetition penalty (if any) applied to l' and to the fp32 logits it computes. The penalty divides
    positive logits by p and multiplies the others by p, which moves two logits apart by at most
    max(p, 1/p) times their distance: E grows by that factor."""

    def __init__(self, weight, hidden, approx, bound, seen=None, config: GenerationConfig | None = None):
        self.weight, self.hidden = weight, hidden
        self.penalty = config.repetition_penalty if config is not None and seen is not None else 1.0
        self.seen = seen
        if self.penalty != 1.0:
            approx = penalize_repetition(approx, seen, self.penalty)
            bound = bound * max(self.penalty, 1 / self.penalty)
        self.approx, self.bound = approx, bound

    def exact(self, rows: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits (penalized) of the pairs (rows[i], vocab_ids[i]). Each is summed on its own, so
        equal weight rows give equal logits and ties go to the first, as in fp32's argmax (a product of
        the gathered rows may sum equal rows differently)."""
        logits = (self.weight[vocab_ids] * self.hidden[rows]).sum(dim=1)
        if self.penalty != 1.0:
            logits = penalize_repetition(logits, self.seen[rows, vocab_ids], self.penalty)
        return logits

    def full(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every fp32 logit (penalized) of these rows (all by default): (rows, V)."""
        logits = _rows_of(self.hidden, rows) @ self.weight.t()
        if self.penalty != 1.0:
            logits = penalize_repetition(logits, _rows_of(self.seen, rows), self.penalty)
        return logits


def screens(config: GenerationConfig) -> bool:
    """Whether rows with these settings may take the bf16 screen (`HeadScreen`): greedy, or sampling
    without a nucleus (top-p), which needs every logit."""
    return is_greedy(config) or config.top_p >= 1.0


def head_screen(model: torch.nn.Module, config: GenerationConfig) -> HeadScreen | None:
    """The model's `HeadScreen` when `config` `screens` and the model has a plain fp32 head on a CPU with
    bf16 units (elsewhere bf16 is emulated and slower than fp32); None to compute the logits."""
    head = _plain_head(model)
    weight = _plain_cpu_weight(head)
    if weight is None or weight.dtype != torch.float32 or not screens(config) or not machine.cpu_has_bf16():
        return None
    return _derived(_SCREENS, head, _checked_screen)


def _checked_screen(weight: torch.Tensor) -> HeadScreen | None:
    """A screen of `weight` with this machine's choice of kernels (measured once per machine and head
    shape, `HeadScreen.measure`), or None where it pays for no row count or leaves the bound."""
    screen = HeadScreen(weight)
    key = f"{machine.machine_key(weight.device)}|head {weight.shape[0]}x{weight.shape[1]}"
    screen.adopt(machine.remembered("decoding.json", key, screen.measure, HeadScreen.valid_choice))
    # after the kernels are chosen: `holds` checks the ones decoding will use
    return screen if any(screen.pays_for.values()) and screen.holds() else None


@torch.inference_mode()
def decode_steps(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    config: GenerationConfig,
    generator: torch.Generator | None = None,
) -> Iterator[list[int]]:
    """Yield the next token of every row, step after step, up to `config.max_new_tokens` steps.

    Prompts must be non-empty and fit the context (see `prepare_prompt`). Stopping a row early is the
    caller's business: stop iterating when every row is done. With the cache, the prompts are
    prefilled once and each step runs one position; without, each step recomputes every window.
    The model decodes in evaluation mode and gets its own mode back afterwards.
    """
    with _evaluating(model):
        batch = LiveBatch(model, config, generator, max_length=_cache_length(prompt_ids, config))
        tokens = batch.join(prompt_ids)
        for step in range(config.max_new_tokens):
            yield tokens
            if step < config.max_new_tokens - 1:
                tokens = batch.step()


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class LiveBatch:
    """Rows decoded together, which may join and leave between steps (continuous batching).

    Rows that join are prefilled together, apart from the others; with the KV cache their keys and
    values are then put beside the others', right-aligned at the longer length, so each row attends to
    its own tokens only and counts its own positions: every row decodes as it would alone (the same
    greedy tokens; sampled rows share one random generator). Rows that leave are dropped from the cache.
    When the cache is full, the slots that are padding in every row are dropped first; when a row's
    window outgrows the context it slides, and every row's window is prefilled again. Without the cache
    each step recomputes every row's window. The model must be in evaluation mode, under inference mode.
    """

    def __init__(self, model, config: GenerationConfig, generator=None, max_length: int | None = None):
        from gptlab.model import DecodeStep

        self.model, self.config, self.generator = model, config, generator
        self.context = model.config.context_length
        self.max_length = min(self.context, max_length or self.context)
        self.weight = next(model.parameters())
        self._head_for: tuple[bool, bool] | None = None  # the (screened, one row) the head was chosen for
        self._choose_head([config])
        self.one_position = None
        if config.use_cache and DecodeStep.fits(model):
            columns = block_columns(model)
            self.one_position = DecodeStep(model, *(columns or ()))
        self.rows: list[list[int]] = []  # each row's tokens, prompt and generated, but the newest
        self.settings: list[GenerationConfig] = []  # each row's sampling settings
        self.starts: list[int] = []  # where each row's window begins
        self.tokens: torch.Tensor | None = None  # (B,) each row's newest token
        self.seen: torch.Tensor | None = None  # (B, V) the tokens each row has seen, for the repetition penalty
        self.cache = None

    def join(self, prompts: Sequence[Sequence[int]], settings: Sequence[GenerationConfig] | None = None) -> list[int]:
        """Add rows for these prompts, sampled by `settings` (one config a row; the batch's by default);
        return the first token of each."""
        from gptlab.model import KVCache

        prompts = [list(p) for p in prompts]
        settings = list(settings) if settings is not None else [self.config] * len(prompts)
        self._choose_head(self.settings + settings)
        if self.seen is None and any(config.repetition_penalty != 1.0 for config in settings):
            self.seen = self._seen(self.rows)  # the rows so far start keeping track too
        seen = self._seen(prompts) if self.seen is not None else None
        cache = None
        if self.config.use_cache:  # the first rows get the batch's cache, later ones one of their own size
            length = self.max_length if self.cache is None else max(len(p) for p in prompts)
            cache = KVCache(self.model.config, len(prompts), length, self.weight.device, self.weight.dtype,
                            max_rows=max(self.config.batch_size, len(prompts)))  # fmt: skip
        first = self._next_tokens(*_left_padded(prompts, self.weight.device), cache, seen, settings)
        if self.cache is None:
            self.cache = cache
        elif cache is not None:
            self.cache.join(cache)
        self.rows += prompts
        self.settings += settings
        self.starts += [0] * len(prompts)
        self.tokens = first if self.tokens is None else torch.cat([self.tokens, first])
        if seen is not None:
            self.seen = torch.cat([self.seen, seen])
        return first.tolist()

    def step(self) -> list[int]:
        """Every row's next token."""
        if self.seen is not None:
            self.seen.scatter_(1, self.tokens[:, None], True)
        for row, token in zip(self.rows, self.tokens.tolist(), strict=True):
            row.append(token)
        if _slide_windows(self.rows, self.starts, self.context) or self.cache is None:
            self.tokens = self._prefill()
        else:
            if self.cache.length == self.cache.max_length:
                self.cache.compact()
            self.tokens = self._next_tokens(self.tokens[:, None], None, self.cache, self.seen, self.settings)
        return self.tokens.tolist()

    def leave(self, rows: Iterable[int]) -> None:
        """Drop these rows (indices into the batch's current rows)."""
        gone = set(rows)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.settings = [self.settings[i] for i in keep]
        self.starts = [self.starts[i] for i in keep]
        if not keep:
            self.tokens = self.seen = self.cache = None
            self._head_for = None  # the next rows choose again, the head checked for changes
            return
        self._choose_head(self.settings)
        index = torch.tensor(keep, device=self.weight.device)
        self.tokens = self.tokens[index]
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.cache is not None:
            self.cache.keep_rows(index)

    def _choose_head(self, settings: Sequence[GenerationConfig]) -> None:
        """For rows decoded by `settings`: the bf16 screen when every row may take it (`head_screen`) and
        it is faster than the fp32 head for this many rows (`HeadScreen.pays`), else the head's logits (no
        head: through `forward`). Each choice checks the head for changes, a pass over it: made only when
        the rows' needs changed (a row that needs every logit joined or left, one row became more or the
        reverse) or the batch was empty."""
        screened = all(screens(config) for config in settings)
        needs = (screened, len(settings) == 1)
        if needs == self._head_for:
            return
        self._head_for = needs
        screen = head_screen(self.model, settings[0]) if screened else None
        self.screen = screen if screen is not None and screen.pays(len(settings)) else None
        self.head = None if self.screen is not None else decoding_head(self.model)

    def _seen(self, rows: list[list[int]]) -> torch.Tensor:
        """(len(rows), V) which tokens each row holds, for the repetition penalty."""
        seen = torch.zeros(len(rows), self.model.config.vocab_size, dtype=torch.bool, device=self.weight.device)
        for i, row in enumerate(rows):
            seen[i, row] = True
        return seen

    def _prefill(self) -> torch.Tensor:
        """Every row's next token from its whole window, the cache filled again."""
        if self.cache is not None:
            self.cache.reset()
        windows = [row[start:] for row, start in zip(self.rows, self.starts, strict=True)]
        return self._next_tokens(*_left_padded(windows, self.weight.device), self.cache, self.seen, self.settings)

    def _next_tokens(self, ids, mask, cache, seen, settings) -> torch.Tensor:
        if self.screen is None and self.head is None:  # a head decoding may not call directly: the whole forward
            logits = self.model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
            return sample_rows(logits, settings, seen, self.generator)
        if self.one_position is not None and mask is None and ids.shape[1] == 1:
            hidden = self.one_position(ids[:, 0], cache)
        else:
            hidden = self.model.hidden_states(ids, mask, None, cache)[:, -1]
        if self.screen is not None:
            return self.screen.next_tokens(hidden, settings, self.generator, seen)
        return sample_rows(self.head(hidden), settings, seen, self.generator)


@dataclasses.dataclass
class _Row:
    """A row of `decode_rows`: its key, its max new tokens and how many it has had."""

    key: Hashable
    limit: int
    count: int = 0


@torch.inference_mode()
def decode_rows(
    model: torch.nn.Module,
    config: GenerationConfig,
    take: Callable[[int], list[tuple[Hashable, list[int], GenerationConfig]]],
    ended: set,
    generator: torch.Generator | None = None,
    max_length: int | None = None,
    join_failed: Callable[[list[Hashable], Exception], None] | None = None,
) -> Iterator[tuple[Hashable, int, int]]:
    """Decode rows as they come, up to `config.batch_size` at a time (continuous batching).

    `take(room)` gives up to `room` new rows as (key, prompt ids, the row's settings), an empty list when
    none wait; it is asked before every step while the batch has room. Each row is sampled by its own
    settings (`sample_rows`) and ends after their `max_new_tokens`; the batch's `config` says how it
    decodes (cache, batch size) and where its first rows' screen applies. Yields (key, token, count)
    for each new token of every row, count being the row's tokens so far. A row also ends when the
    reader puts its key in `ended` while it reads the row's token. Ends when no row is left and `take`
    gives none.
    `max_length` bounds the KV cache (the context by default; see `_cache_length`). With `join_failed`,
    an error while rows join (their prefill) goes to `join_failed(their keys, error)` and the others
    decode on; without it, the error is raised.
    """
    with _evaluating(model):
        batch = LiveBatch(model, config, generator, max_length)
        rows: list[_Row] = []
        while True:
            tokens = batch.step() if rows else []
            new = take(config.batch_size - len(rows)) if len(rows) < config.batch_size else []
            if new:
                try:
                    # (the batch is unchanged if this fails)
                    tokens += batch.join([ids for _, ids, _ in new], [settings for _, _, settings in new])
                    rows += [_Row(key, settings.max_new_tokens) for key, _, settings in new]
                except Exception as error:
                    if join_failed is None:
                        raise
                    join_failed([key for key, _, _ in new], error)
            if not rows:
                if new:  # they failed: others may be waiting
                    continue
                return
            for row, token in zip(rows, tokens, strict=True):
                row.count += 1
                yield row.key, token, row.count
            gone = {i for i, row in enumerate(rows) if row.key in ended or row.count >= row.limit}
            if gone:
                batch.leave(gone)
                ended.difference_update(rows[i].key for i in gone)
                rows = [row for i, row in enumerate(rows) if i not in gone]


def _taking_from(prompts: list[list[int]], settings: GenerationConfig) -> Callable[[int], list[tuple]]:
    """A `take` that hands out the prompts in order as (index, prompt, `settings`)."""
    waiting = collections.deque((i, prompt, settings) for i, prompt in enumerate(prompts))
    return lambda room: [waiting.popleft() for _ in range(min(room, len(waiting)))]


def _cache_length(prompts: Sequence[Sequence[int]], config: GenerationConfig) -> int:
    """The KV cache a set of prompts needs: what the longest will reach. Rows that join later fit too: when
    the cache is full, every row that still needs a slot has leading padding that `KVCache.compact` drops."""
    return max(len(p) for p in prompts) + config.max_new_tokens - 1


def prepare_prompt(ids: Sequence[int], context_length: int, config: GenerationConfig, eot_id: int | None) -> list[int]:
    """A prompt ready to decode: an empty one starts from end-of-text; one longer than the context is
    truncated to its most recent tokens (with a GenerationWarning) or refused, by `config.prompt_overflow`."""
    ids = list(ids)
    if not ids:
        if eot_id is None:
            raise GptlabError("the prompt is empty and no end-of-text id was given to start from; pass eot_id")
        return [eot_id]
    if len(ids) > context_length:
        if config.prompt_overflow == "error":
            raise GptlabError(
                f"the prompt has {len(ids)} tokens but the context length is {context_length}; "
                "shorten it or use prompt_overflow 'truncate'"
            )
        warnings.warn(
            f"the prompt has {len(ids)} tokens, more than the context length {context_length}; "
            f"keeping the last {context_length}",
            GenerationWarning,
            stacklevel=_caller_level(),
        )
        ids = ids[-context_length:]
    return ids


def _caller_level() -> int:
    """The `stacklevel` that makes a warning raised by this function's caller name the first frame
    outside gptlab: the user's own line, however deep in the library the warning starts."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the caller, which warns: stacklevel 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _config(config: GenerationConfig | None) -> GenerationConfig:
    if config is None:
        return GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise GptlabError(f"config must be a GenerationConfig, got {type(config).__name__}: GenerationConfig(**values)")
    return config


def as_texts(prompts: list[str] | str) -> list[str]:
    """One text or several (prompts, texts to classify), as a list of texts; anything else is refused."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if isinstance(texts, (bytes, torch.Tensor)) or not isinstance(texts, Iterable):
        raise GptlabError(f"expected a text or a list of texts, got {prompts!r:.80}")
    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise GptlabError(f"expected a text or a list of texts, got {prompts!r:.80}")
    return texts


def _is_id(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex()
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_prompt(prompt) -> bool:
    if isinstance(prompt, torch.Tensor):
        return prompt.dim() == 1 and not prompt.is_floating_point() and not prompt.is_complex()
    return isinstance(prompt, Iterable) and not isinstance(prompt, (str, bytes)) and all(_is_id(i) for i in prompt)


def _check_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> None:
    vocab = model.config.vocab_size
    for prompt in prompts:
        if not _is_prompt(prompt):
            raise GptlabError(
                f"prompt ids must be a list of prompts, each a list of token ids; got a prompt {prompt!r:.80} "
                "(for text use generate())"
            )
        for i in prompt:
            if not 0 <= i < vocab:
                raise GptlabError(f"token id {i} is outside the model's vocabulary of {vocab}")


def generate_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    eot_id: int | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt, `config.batch_size` rows decoding at a time (a row that ends
    makes room for the next prompt).

    A row ends at `max_new_tokens` or, when `eot_id` is given and `config.stop_at_eot`, at end-of-text
    (not included). Stop strings are checked on text: use `generate` or `stream` for them.
    """
    config = _config(config)
    if config.stop:
        raise GptlabError("stop strings are checked on decoded text; use generate() or stream() with a tokenizer")
    _check_ids(model, prompt_ids)
    context = model.config.context_length
    prompts = [prepare_prompt(p, context, config, eot_id) for p in prompt_ids]
    stop_id = eot_id if config.stop_at_eot else None
    generator = make_generator(config, next(model.parameters()).device)
    results: list[list[int]] = [[] for _ in prompts]
    ended: set[int] = set()
    for index, token, _ in decode_rows(
        model, config, _taking_from(prompts, config), ended, generator, _cache_length(prompts, config)
    ):
        if token == stop_id:
            ended.add(index)
        else:
            results[index].append(token)
    return results


# ---------------------------------------------------------------- text: stop strings, UTF-8, streaming


class _RowText:
    """One row's decoded text: bytes of a character split across tokens are held back until complete,
    and so is any ending that could be the start of a stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.done = False

    def add(self, data: bytes) -> str:
        """Take a token's bytes; return the text now safe to show (empty while held back)."""
        self.pending += self.decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End the row; return the rest of its text."""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if found:
            self.done = True
            piece, self.pending = self.pending[: min(found)], ""
            return piece
        if final:
            self.done = True
            piece, self.pending = self.pending, ""
            return piece
        hold = self._stop_prefix_length()
        cut = len(self.pending) - hold
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        return piece

    def _stop_prefix_length(self) -> int:
        """Length of the longest ending of the pending text that begins some stop string."""
        longest = min(max((len(s) for s in self.stop), default=1) - 1, len(self.pending))
        for length in range(longest, 0, -1):
            tail = self.pending[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0


def _check_tokenizer(model: torch.nn.Module, tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptlabError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
            "use the tokenizer saved with this model's run"
        )


def stream_rows(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    config: GenerationConfig,
    on_row_end: Callable[[int, int, str], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """An iterator of (prompt index, text piece) as the rows of each batch are decoded; every piece is
    valid UTF-8. Bad input is refused here, before the iterator starts.

    A row ends at `max_new_tokens`, at end-of-text (when `config.stop_at_eot`) or at a stop string,
    which is found in the decoded text even when it spans several tokens and is not included.
    `on_row_end(prompt index, tokens generated, reason)` hears of each row's end after its last piece:
    reason "stop" (end-of-text, counted, or a stop string) or "length" (`max_new_tokens`).
    """
    config = _config(config)
    _check_tokenizer(model, tokenizer)
    _check_ids(model, prompt_ids)
    context = model.config.context_length
    prompts = [prepare_prompt(p, context, config, tokenizer.eot_id) for p in prompt_ids]
    on_row_end = on_row_end or (lambda index, tokens, reason: None)
    take = _taking_from(prompts, config)
    return stream_texts(model, tokenizer, config, take, on_row_end, _cache_length(prompts, config))


def stream_texts(
    model: torch.nn.Module,
    tokenizer,
    config: GenerationConfig,
    take: Callable[[int], list[tuple[Hashable, list[int], GenerationConfig]]],
    on_row_end: Callable[[Hashable, int, str], None],
    max_length: int | None = None,
    abandoned: Callable[[Hashable], bool] = lambda key: False,
    join_failed: Callable[[list[Hashable], Exception], None] | None = None,
) -> Iterator[tuple[Hashable, str]]:
    """(key, text piece) as rows decode, rows joining through `take` as others end (see `decode_rows`).

    `take(room)` gives (key, prompt ids, the row's settings): its prompt prepared (`prepare_prompt`), and
    its own sampling settings, `max_new_tokens` and `stop` strings; `config` gives the rest (the cache,
    the batch size, whether end-of-text ends a row). `on_row_end(key, tokens generated, reason)` hears of
    each row's end after its last piece. A row whose reader is gone (`abandoned(key)`) ends without a
    word. `join_failed`: as in `decode_rows`."""
    stop_id = tokenizer.eot_id if config.stop_at_eot else None
    generator = make_generator(config, next(model.parameters()).device)
    rows: dict[Hashable, tuple[GenerationConfig, _RowText]] = {}
    ended: set[Hashable] = set()

    def take_rows(room: int) -> list[tuple[Hashable, list[int], GenerationConfig]]:
        new = take(room)
        rows.update((key, (settings, _RowText(settings.stop))) for key, _, settings in new)
        return new

    def failed(keys: list[Hashable], error: Exception) -> None:
        for key in keys:
            del rows[key]
        join_failed(keys, error)

    failures = failed if join_failed is not None else None
    for key, token, count in decode_rows(model, config, take_rows, ended, generator, max_length, failures):
        settings, text = rows[key]
        if abandoned(key):
            ended.add(key)
            del rows[key]
            continue
        piece = text.finish() if token == stop_id else text.add(tokenizer.decode_bytes([token]))
        reason = "stop"
        if not text.done and count == settings.max_new_tokens:
            piece += text.finish()
            reason = "length"
        if piece:
            yield key, piece
        if text.done:
            ended.add(key)
            del rows[key]
            on_row_end(key, count, reason)


def stream(model: torch.nn.Module, tokenizer, prompt: str, config: GenerationConfig | None = None) -> Iterator[str]:
    """The completion of one prompt as text pieces, as they are decoded (an empty prompt starts from end-of-text)."""
    if not isinstance(prompt, str):
        raise GptlabError(f"stream takes one prompt text, got {prompt!r:.80}; generate() takes several")
    rows = stream_rows(model, tokenizer, [tokenizer.encode(prompt)], _config(config))
    return (piece for _, piece in rows)


def generate(
    model: torch.nn.Module, tokenizer, prompts: list[str] | str, config: GenerationConfig | None = None
) -> list[str]:
    """The completion (without the prompt) of each prompt, decoded in batches of different lengths."""
    prompts = as_texts(prompts)
    completions = [""] * len(prompts)
    for i, piece in stream_rows(model, tokenizer, tokenizer.encode_batch(prompts), _config(config)):
        completions[i] += piece
    return completions


# ---------------------------------------------------------------- loading a model to generate with


def load_generator(path: str, device: str = "auto", dtype: str = "auto", command: str = "generate"):
    """A run's model, ready to generate: on `device` (auto: CUDA, MPS, then CPU), its weights in `dtype`
    (the training rule: auto is bf16 on CUDA; bf16 needs a GPU or a CPU with bf16 units, else fp32),
    checked to be a language model for its tokenizer. Returns a LoadedRun."""
    from gptlab.checkpoint import load_run
    from gptlab.train import resolve_autocast, resolve_device

    target = resolve_device(device)
    weights_dtype = resolve_autocast(dtype, target)
    run = load_run(path, device=target)
    head = getattr(run.model, "lm_head", None)
    if head is None or head.out_features < run.tokenizer.vocab_size:
        outputs = getattr(head, "out_features", "no")
        raise GptlabError(
            f"{path} has {outputs} outputs per position, not a language model over "
            f"{run.tokenizer.vocab_size} tokens; {command} needs a pretrained or instruction-tuned run"
        )
    if weights_dtype is not None:
        run.model.to(weights_dtype)
    return run


# ---------------------------------------------------------------- chat


class Chat:
    """A conversation with a model. With a template (the run's `template`), messages are formatted as turns
    and the oldest are dropped to fit the context; without one, the model freely continues the transcript."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: GenerationConfig,
        template: str | None,
        system: str | None = None,
    ):
        from gptlab.templates import get_template

        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template) if template else None
        stop = list(config.stop) + list(self.template.stop if self.template else ())
        self.config = dataclasses.replace(config, stop=stop)
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.transcript = ""

    def _budget(self) -> int:
        """Prompt tokens that leave room for a full reply (at least half the context)."""
        context = self.model.config.context_length
        return max(context // 2, context - self.config.max_new_tokens)

    def _prompt_ids(self, message: str) -> list[int]:
        from gptlab.templates import fit_messages, format_messages

        if self.template is None:
            text = self._continued(message)
        else:
            self.messages = fit_messages(
                self.template,
                [*self.messages, {"role": "user", "content": message}],
                lambda text: len(self.tokenizer.encode(text)),
                self._budget(),
            )
            text = format_messages(self.template, self.messages)
        return self.tokenizer.encode(text)[-self._budget() :]

    def _continued(self, message: str) -> str:
        """The transcript with `message` on a line of its own (as it was typed)."""
        if self.transcript and not self.transcript.endswith("\n"):
            return f"{self.transcript}\n{message}"
        return self.transcript + message

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to `message`; the reply joins the history once it is complete."""
        ids = self._prompt_ids(message)
        reply = ""
        for _, piece in stream_rows(self.model, self.tokenizer, [ids], self.config):
            reply += piece
            yield piece
        if self.template is None:
            self.transcript = self._continued(message) + reply
        else:
            self.messages.append({"role": "assistant", "content": reply.strip()})
