import dataclasses
import json
import re
import warnings
from itertools import pairwise

import pytest
import torch

from gptlab.config import GenerationConfig, GPTConfig
from gptlab.errors import GptlabError
from gptlab.generate import (
    Chat,
    GenerationWarning,
    HeadScreen,
    LiveBatch,
    decode_steps,
    decoding_head,
    draw,
    generate,
    generate_ids,
    head_screen,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    penalize_repetition,
    sample_next,
    stream,
)
from gptlab.model import GPT, KVCache
from gptlab.templates import format_instruction
from gptlab.tokenizer import ByteTokenizer

EOT = 256
GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=40, stop_at_eot=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models decode fastest on one thread (and a busy machine makes two threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REAL_ADOPT = HeadScreen.adopt  # before `_screens_pay` replaces it


@pytest.fixture(autouse=True)
def _screens_pay(monkeypatch):
    """The screen decodes wherever a test asks for it: its tokens are tested on every CPU, whether it is
    faster than the fp32 head (`HeadScreen.measure`, which still picks the kernels) only on its own."""

    def paying(screen, choice):
        REAL_ADOPT(screen, choice)
        screen.pays_for = dict.fromkeys(screen.pays_for, True)

    monkeypatch.setattr(HeadScreen, "adopt", paying)


def tiny_gpt(embedding_scale: float = 1.0) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=257, context_length=24, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        gpt.token_embedding.weight.mul_(embedding_scale)
    return gpt


def varied_gpt() -> GPT:
    """A tiny random GPT with an untied head, scaled up: greedy decoding gives varied tokens (the tied
    models here repeat the last token), each at least 1e-4 above the runner-up on the paths tested."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=257, context_length=24, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False))
    with torch.no_grad():
        gpt.lm_head.weight.mul_(4), gpt.token_embedding.weight.mul_(4)
    return gpt.eval()


@pytest.fixture
def model():
    """A tiny random GPT whose (tied) embeddings are scaled up so greedy choices are far from ties."""
    return tiny_gpt(embedding_scale=40)


class ScriptedModel(torch.nn.Module):
    """A stand-in whose next token is a fixed function of the last token, to script exact outputs.

    Unmapped tokens lead to end-of-text. Records each forward's input and whether inference mode was on.
    """

    def __init__(self, table: dict[int, int], context_length: int = 64):
        super().__init__()
        self.config = GPTConfig(vocab_size=257, context_length=context_length, n_layer=1, n_head=1, n_embd=4)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.table = torch.full((257,), EOT)
        for token, following in table.items():
            self.table[token] = following
        self.inputs: list[torch.Tensor] = []
        self.inference_mode: list[bool] = []

    def forward(self, ids, attention_mask=None, cache=None, last_only=False):
        self.inputs.append(ids.clone())
        self.inference_mode.append(torch.is_inference_mode_enabled())
        logits = torch.full((ids.shape[0], 1, 257), -10.0)
        logits[torch.arange(ids.shape[0]), 0, self.table[ids[:, -1]]] = 10.0
        return logits


def script(text: str, start: str = "x") -> ScriptedModel:
    """A model that continues `start` with `text` (distinct bytes) and then ends with end-of-text."""
    data = (start[-1] + text).encode()
    return ScriptedModel(dict(pairwise(data)) | {data[-1]: EOT})


def greedy(**fields) -> GenerationConfig:
    return GenerationConfig(**{"temperature": 0.0, "max_new_tokens": 40, "stop_at_eot": False, **fields})


# ---------------------------------------------------------------- the decoding loop


@pytest.mark.parametrize("max_new_tokens", [1, 10, 60])
def test_greedy_with_cache_equals_without_cache_token_for_token(model, max_new_tokens):
    prompts = [[1, 2, 3], list(range(40, 60)), [7]]
    cached = generate_ids(model, prompts, greedy(max_new_tokens=max_new_tokens))
    uncached = generate_ids(model, prompts, greedy(max_new_tokens=max_new_tokens, use_cache=False))
    assert cached == uncached
    assert [len(row) for row in cached] == [max_new_tokens] * 3


def test_batched_rows_equal_generating_each_alone_stopping_on_their_own(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100], list(range(30, 50)), [200, 201, 202]]
    free = generate_ids(model, prompts, greedy())
    eot = free[0][6]  # a token the first row produces early: that row must stop there, the others need not
    batched = generate_ids(model, prompts, greedy(stop_at_eot=True), eot_id=eot)
    alone = [generate_ids(model, [p], greedy(stop_at_eot=True), eot_id=eot)[0] for p in prompts]
    assert batched == alone
    assert batched[0] == free[0][: free[0].index(eot)]
    assert len({len(row) for row in batched}) > 1


def test_batch_size_splits_prompts_without_changing_results(model):
    prompts = [[i, i + 1] * (i % 4 + 1) for i in range(5)]
    assert generate_ids(model, prompts, greedy(batch_size=2)) == generate_ids(model, prompts, greedy())


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_that_join_as_others_end_decode_as_they_would_alone(use_cache, monkeypatch):
    """Continuous batching: 2 rows at a time, so each prompt joins when a row ends. They join caches
    shorter and longer than their prompts (right-aligned or shifting the others), a 23-token prompt
    outgrows the 24-token context and slides, the cache compacts its shared padding, and a row that
    ends at end-of-text leaves early."""
    model = varied_gpt()
    prompts = [[5, 6, 7], [9], list(range(30, 53)), list(range(60, 72)), [200, 201], [3] * 8, [17, 18, 19, 20]]
    free = generate_ids(model, prompts[:1], greedy(max_new_tokens=30))
    eot = free[0][4]  # the first row ends early, at this token
    config = greedy(max_new_tokens=30, stop_at_eot=True, use_cache=use_cache)
    alone = [generate_ids(model, [p], config, eot_id=eot)[0] for p in prompts]
    events = []
    join, compact = KVCache.join, KVCache.compact

    def spied_join(cache, other):
        events.append(("longer" if other.length > cache.length else "shorter", other.length != cache.length))
        join(cache, other)

    def spied_compact(cache):
        length = cache.length
        compact(cache)
        events.append(("compact", cache.length < length))

    monkeypatch.setattr(KVCache, "join", spied_join)
    monkeypatch.setattr(KVCache, "compact", spied_compact)
    joined = generate_ids(model, prompts, dataclasses.replace(config, batch_size=2), eot_id=eot)
    assert joined == alone
    assert alone[0] == free[0][:4] and len({len(row) for row in alone}) > 1
    assert sum(len(set(row)) > 10 for row in alone) >= 4  # varied tokens, not one repeated
    assert max(len(p) + len(row) for p, row in zip(prompts, alone, strict=True)) > 24  # a window slid
    if use_cache:  # the cache's ways of taking rows in were all used
        assert {"shorter", "longer"} <= {kind for kind, _ in events} and ("compact", True) in events


def test_decode_rows_takes_rows_as_room_frees_and_ends_the_ones_it_is_told():
    from gptlab.generate import decode_rows

    gpt = tiny_gpt(embedding_scale=40)
    waiting = [("a", [1, 2], greedy(max_new_tokens=3)), ("b", [3], greedy(max_new_tokens=3)),
               ("c", [4, 5, 6], greedy(max_new_tokens=2)), ("d", [7], greedy(max_new_tokens=3))]  # fmt: skip
    asked, ended, seen = [], set(), {}

    def take(room):
        asked.append(room)
        chosen, waiting[:] = waiting[:room], waiting[room:]
        return chosen

    for key, token, count in decode_rows(gpt, greedy(max_new_tokens=3, batch_size=2), take, ended):
        seen.setdefault(key, []).append(token)
        assert count == len(seen[key])
        if key == "a":
            ended.add(key)  # "a" ends at its first token, making room for "c" at the next step
    assert [len(seen[key]) for key in "abcd"] == [1, 3, 2, 3]
    assert asked[:3] == [2, 1, 2] and not ended  # "c" joins as "a" leaves; "d" once "b" and "c" are done
    alone = {key: generate_ids(gpt, [ids], greedy(max_new_tokens=3))[0] for key, ids in
             [("a", [1, 2]), ("b", [3]), ("c", [4, 5, 6]), ("d", [7])]}  # fmt: skip
    assert seen["a"] == alone["a"][:1] and seen["c"] == alone["c"][:2] and seen["b"] == alone["b"]
    assert seen["d"] == alone["d"]


def test_rows_with_their_own_sampling_settings_decode_as_they_would_alone():
    """Rows of one batch with different settings, the ones that need no randomness compared with their
    runs alone: greedy, greedy with a repetition penalty (which joins a batch that kept no record of
    seen tokens), top-k 1 at temperature 1 (greedy by another road); a sampled row among them."""
    from gptlab.generate import decode_rows

    model = varied_gpt()
    plain, penalized = greedy(max_new_tokens=12), greedy(max_new_tokens=12, repetition_penalty=1.5)
    top1 = greedy(max_new_tokens=12, temperature=1.0, top_k=1)
    sampled = greedy(max_new_tokens=12, temperature=1.0)
    prompts = {"plain": ([1, 2, 3], plain), "sampled": ([9, 8], sampled), "penalized": ([50, 51, 50], penalized),
               "top1": ([7, 7], top1), "late": ([4, 5, 6, 7], penalized)}  # fmt: skip
    waiting = list(prompts.items())
    out: dict[str, list[int]] = {}

    def take(room):  # the plain row first, alone, then the others as room frees (batch of 3)
        chosen = waiting[: min(room, 1 if not out else room)]
        del waiting[: len(chosen)]
        return [(key, ids, settings) for key, (ids, settings) in chosen]

    for key, token, _ in decode_rows(model, greedy(batch_size=3), take, set()):
        out.setdefault(key, []).append(token)
    for key in ("plain", "penalized", "top1", "late"):
        ids, settings = prompts[key]
        assert out[key] == generate_ids(model, [ids], settings)[0], key
    assert len(out["sampled"]) == 12
    assert out["late"] != generate_ids(model, [prompts["late"][0]], plain)[0]  # its penalty mattered


def test_the_screen_returns_when_the_rows_that_needed_logits_leave(monkeypatch):
    """A sampled row switches a greedy batch to the full logits; once it has left, the bf16 screen is
    used again, and the greedy rows decode as they would alone throughout."""
    import gptlab.machine

    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)
    model = varied_gpt().eval()
    plain, sampled = greedy(max_new_tokens=12), greedy(max_new_tokens=12, temperature=1.0, top_p=0.9)
    alone = generate_ids(model, [[1, 2, 3]], plain)[0]
    with torch.inference_mode():
        batch = LiveBatch(model, greedy(batch_size=2))
        tokens = [batch.join([[1, 2, 3]])[0]]
        assert batch.screen is not None
        batch.join([[9, 8]], [sampled])
        assert batch.screen is None and batch.head is not None
        for step in range(11):
            if step == 4:
                batch.leave([1])
                assert batch.screen is not None and batch.head is None
            tokens.append(batch.step()[0])
    assert tokens == alone


def test_sample_rows_samples_each_group_of_settings_by_its_own():
    from gptlab.generate import sample_rows

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9], [0.0, 3.0, 1.0], [5.0, 0.0, 4.0]])
    seen = torch.tensor([[False] * 3, [True, False, False], [False] * 3, [True, False, False]])
    settings = [
        greedy(),
        greedy(repetition_penalty=3.0),
        greedy(temperature=2.0, top_k=1),
        greedy(repetition_penalty=3.0),
    ]
    assert sample_rows(logits, settings, seen).tolist() == [1, 2, 1, 2]  # 2.0 / 3 < 1.9 and 5.0 / 3 < 4.0


def test_generation_past_the_context_slides_the_window(model):
    context = model.config.context_length
    (row,) = generate_ids(model, [[1, 2, 3]], greedy(max_new_tokens=3 * context))
    assert len(row) == 3 * context
    # Right after the first slide the model sees only the kept, most recent tokens, from position 0.
    steps = decode_steps(model, [[1, 2, 3]], greedy(max_new_tokens=3 * context))
    tokens = [1, 2, 3] + [next(steps)[0] for _ in range(context - 2)]
    assert len(tokens) == context + 1
    kept = tokens[-(context - context // 4) :]
    expected = model(torch.tensor([kept]))[0, -1].argmax().item()
    assert next(steps)[0] == expected


def test_decoding_steps_skip_the_modules_of_a_plain_model_with_the_same_tokens(model, monkeypatch):
    """Single-position steps go through `DecodeStep`; a hooked model takes the modules, to the same tokens."""
    import gptlab.model

    calls = []
    monkeypatch.setattr(gptlab.model.DecodeStep, "__call__", _counted(gptlab.model.DecodeStep.__call__, calls))
    prompts = [[1, 2, 3], list(range(40, 50)), [7]]
    for config in (greedy(max_new_tokens=12), greedy(max_new_tokens=12, temperature=0.7, seed=3, top_k=20)):
        plain = generate_ids(model, prompts, config)
        assert len(calls) == 11  # every step after the prefill
        model.blocks[0].register_forward_pre_hook(lambda module, args: None)
        hooked = generate_ids(model, prompts, config)
        assert hooked == plain and len(calls) == 11
        model.blocks[0]._forward_pre_hooks.clear()
        calls.clear()
    expected = generate_ids(model, prompts, greedy(max_new_tokens=5))
    calls.clear()
    model.train()  # as when training prints samples: decoding switches to evaluation first
    assert generate_ids(model, prompts, greedy(max_new_tokens=5)) == expected
    assert len(calls) == 4 and model.training


def _counted(function, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted


def test_decoding_runs_in_inference_mode_and_restores_training_mode():
    scripted = script("abc")
    scripted.train()
    generate(scripted, ByteTokenizer(), "x", greedy())
    assert scripted.inference_mode and all(scripted.inference_mode)
    assert scripted.training


def test_cache_prefills_once_then_feeds_one_position_per_step():
    scripted = script("abcdef")
    generate(scripted, ByteTokenizer(), "hello x", greedy())
    assert scripted.inputs[0].shape == (1, 7)
    assert all(ids.shape == (1, 1) for ids in scripted.inputs[1:])


def test_decoding_head_equals_the_model_head_after_weight_updates(model):
    hidden = torch.randn(3, 32)
    assert torch.allclose(decoding_head(model)(hidden), model.lm_head(hidden), atol=1e-4)
    with torch.no_grad():
        model.lm_head.weight.mul_(-0.5)  # an optimizer step updates the weights in place like this
    assert torch.allclose(decoding_head(model)(hidden), model.lm_head(hidden), atol=1e-4)


def test_decoding_follows_a_fused_optimizer_step_which_leaves_the_version_unchanged(model, monkeypatch):
    import gptlab.machine

    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)  # the screen too, wherever this runs
    model.train()
    hidden = torch.randn(3, 32)
    decoding_head(model)(hidden), head_screen(model, greedy()).greedy(hidden)  # both copies made and kept
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]])).backward()
    version = model.lm_head.weight._version
    optimizer.step()
    assert model.lm_head.weight._version == version  # what makes the version alone not enough
    assert torch.allclose(decoding_head(model)(hidden), model.lm_head(hidden), atol=1e-4)
    assert torch.equal(head_screen(model, greedy()).greedy(hidden), model.lm_head(hidden).argmax(dim=-1))


def test_decoding_follows_an_edit_of_one_entry_through_data():
    """`.data` edits bump no version: the head's checksum of every entry still sees one changed entry
    (a sparse grid of entries, the check before, missed most of them)."""
    model = GPT(GPTConfig(vocab_size=300, context_length=16, n_layer=1, n_head=2, n_embd=32)).eval()
    hidden = torch.randn(3, 32)
    decoding_head(model)(hidden)  # the transposed copy made and kept
    version = model.lm_head.weight._version
    model.lm_head.weight.data[201, 7] += 5.0  # a row and a column a stride-4 grid never reads
    assert model.lm_head.weight._version == version
    torch.testing.assert_close(decoding_head(model)(hidden), model.lm_head(hidden), atol=1e-5, rtol=1e-5)


def test_bf16_model_generates(model):
    rows = generate_ids(model.to(torch.bfloat16), [[1, 2], [3]], greedy(max_new_tokens=30))
    assert [len(r) for r in rows] == [30, 30]


# ---------------------------------------------------------------- the bf16 screen of the head


def near_tie_head() -> torch.Tensor:
    """A random (V, C) head in which rows 7 and 9 are both row 3 times (1 + 2e-5): bf16 cannot tell
    the three apart, fp32 can (except 7 from 9, where the first index wins, as in argmax)."""
    torch.manual_seed(1)
    weight = torch.randn(300, 24) * 0.02
    weight[7] = weight[3] * (1 + 2e-5)
    weight[9] = weight[7]
    return weight


def test_head_screen_picks_fp32_argmax_even_where_bf16_ties():
    weight = near_tie_head()
    screen = HeadScreen(weight)
    toward_3 = weight[3] / weight[3].norm() * 5
    hidden = torch.cat([toward_3[None], torch.randn(40, 24) * 3])
    bf16_logits = hidden.bfloat16() @ weight.bfloat16().t()
    assert bf16_logits[0, 3] == bf16_logits[0, 7]  # the case bf16 alone gets wrong
    expected = (hidden @ weight.t()).argmax(dim=-1)
    assert expected[0] == 7
    assert torch.equal(screen.greedy(hidden), expected)  # all rows at once
    assert [screen.greedy(row[None]).item() for row in hidden] == expected.tolist()  # and one at a time


def test_head_screen_bound_covers_the_bf16_error():
    weight = near_tie_head()
    screen = HeadScreen(weight)
    hidden = torch.randn(64, 24) * torch.logspace(-2, 2, 64)[:, None]
    approx, bound = screen.approximate(hidden)
    error = (approx.double() - hidden.double() @ weight.double().t()).abs().amax(dim=1)
    assert bool((error <= bound).all())
    candidates = (approx >= (approx.amax(dim=1) - 2 * bound)[:, None]).sum(dim=1)
    assert candidates.max() <= 30  # and it is not vacuous: at most a tenth of the 300 tokens stay


def test_head_screen_holds_for_tiny_and_subnormal_hidden_states():
    generator = torch.Generator().manual_seed(0)
    nearly_equal = torch.randn(1, 64, generator=generator) * 0.02 + torch.randn(512, 64, generator=generator) * 1e-4
    screen = HeadScreen(nearly_equal)
    hidden = torch.randn(20, 64, generator=generator) * 1e-24  # |h|^2 underflows in fp32
    expected = (hidden.double() @ nearly_equal.double().t()).argmax(dim=-1)
    assert torch.equal(screen.greedy(hidden), expected)
    assert [screen.greedy(row[None]).item() for row in hidden] == expected.tolist()
    # Subnormal entries round by an absolute amount in bf16 (here the first by a third of itself).
    head = torch.tensor([[1e15, 0.0], [0.0, 0.7e15]])
    subnormal = torch.tensor([[1.49 * 2.0**-133, 2.0**-132]])
    assert (subnormal @ head.t()).argmax().item() == 0 != (subnormal.bfloat16().float() @ head.t()).argmax().item()
    assert HeadScreen(head).greedy(subnormal).item() == 0


def test_head_screen_falls_back_where_every_token_ties_or_the_state_is_not_finite():
    screen = HeadScreen(torch.zeros(3000, 16))  # every logit 0: all 3,000 tokens are candidates
    assert screen.greedy(torch.randn(2, 16)).tolist() == [0, 0]
    screen = HeadScreen(near_tie_head())
    hidden = torch.randn(2, 24)
    hidden[1, 0] = float("nan")
    assert torch.equal(screen.greedy(hidden), (hidden @ screen.weight.t()).argmax(dim=-1))


def test_head_screen_gives_equal_rows_equal_logits_so_the_first_wins():
    """A head with two equal rows (new tokens initialised alike, say): fp32's argmax takes the first; a
    product of the gathered candidate rows could sum the two differently and pick the second."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(16, 64, generator=generator)
    weight[9] = weight[2]
    hidden = (weight[2] * 3 + torch.randn(64, generator=generator) * 0.5)[None]
    assert (hidden @ weight.t()).argmax().item() == 2
    screen = HeadScreen(weight)
    assert screen.greedy(hidden).item() == 2
    top_1 = GenerationConfig(temperature=1.0, top_k=1)  # keeps both tied tokens: a draw between them
    for seed in range(8):
        fp32 = sample_next(hidden @ weight.t(), top_1, None, torch.Generator().manual_seed(seed))
        assert torch.equal(screen.next_tokens(hidden, [top_1], torch.Generator().manual_seed(seed)), fp32)


def test_head_screen_bound_covers_subnormal_states_flushed_to_zero():
    """Several rows go to a bf16 matrix product, which on CPUs with AMX flushes subnormal inputs to zero;
    the bound covers it, so the screen still picks fp32's token."""
    weight = torch.zeros(64, 32)
    weight[0, 0], weight[1, 1] = 2.0, 1.0
    hidden = torch.zeros(4, 32)
    hidden[:, 0], hidden[:, 1] = 1e-38, 1.5e-38  # the first below fp32's smallest normal number
    assert (hidden @ weight.t()).argmax(dim=1).tolist() == [0, 0, 0, 0]
    assert HeadScreen(weight).greedy(hidden).tolist() == [0, 0, 0, 0]
    assert HeadScreen(weight).greedy(hidden[:1]).tolist() == [0]


def test_head_screen_takes_fp32_where_bf16_overflows_below_fp32s_largest():
    weight = torch.tensor([[1.0], [0.999]])
    hidden = torch.tensor([[3.397e38]])  # both logits finite in fp32, inf in bf16
    assert torch.isfinite(hidden @ weight.t()).all()
    screen = HeadScreen(weight)
    assert screen.greedy(hidden).item() == 0
    plain = GenerationConfig(temperature=1.0)
    expected = sample_next(hidden @ weight.t(), plain, None, torch.Generator().manual_seed(0))
    assert torch.equal(screen.next_tokens(hidden, [plain], torch.Generator().manual_seed(0)), expected)


def test_head_screen_refuses_a_cpu_whose_bf16_products_exceed_the_bound():
    class Coarse(HeadScreen):  # results rounded like a kernel that sums in bf16 would leave them
        def approximate(self, hidden):
            logits, bound = super().approximate(hidden)
            return logits + 3 * bound[:, None], bound

    assert HeadScreen(near_tie_head()).holds()
    assert not Coarse(near_tie_head()).holds()


@pytest.mark.parametrize("rows", [1, 5])
def test_every_bf16_kernel_the_screen_may_take_stays_within_the_bound(rows):
    """Whichever kernel `measure` picks, the bf16 logits are the same up to the bound, and decoding
    through it picks fp32's tokens."""
    from gptlab.generate import _BF16_PRODUCTS

    weight = near_tie_head()
    hidden = torch.randn(rows, 24, generator=torch.Generator().manual_seed(2))
    kernels = [name for name in _BF16_PRODUCTS if rows == 1 or name != "vector"]
    assert len(kernels) == (3 if rows == 1 else 2)
    for name in kernels:
        screen = HeadScreen(weight)
        setattr(screen, "one_row_product" if rows == 1 else "rows_product", name)
        approx, bound = screen.approximate(hidden)
        assert approx.shape == (rows, 300) and approx.dtype == torch.float32
        assert ((approx - hidden @ weight.t()).abs().amax(dim=1) <= bound / 2).all(), name
        assert screen.holds(), name
        assert torch.equal(screen.greedy(hidden), (hidden @ weight.t()).argmax(dim=-1)), name


@pytest.mark.parametrize("screen_share, pays", [(0.5, True), (0.97, False), (1.3, False)])
def test_measure_keeps_the_screen_only_where_it_beats_the_fp32_head(screen_share, pays, monkeypatch):
    """The kernel is the fastest candidate; the screen pays where it takes under 0.9 of the head's time
    (close calls go to the fp32 head), for one row and for more rows alike."""
    import gptlab.machine

    def fake_fastest(candidates, repeats):
        if "fp32 head" in candidates:
            times = {"screen": screen_share, "fp32 head": 1.0}
        else:  # the kernels: the last candidate is the fastest
            times = {name: 1.0 - 0.1 * i for i, name in enumerate(candidates)}
        return min(times, key=times.get), times

    monkeypatch.setattr(gptlab.machine, "fastest", fake_fastest)
    screen = HeadScreen(near_tie_head())
    choice = screen.measure()
    assert screen.one_row_product == screen.rows_product == "rows"
    assert screen.pays_for == {"one row": pays, "rows": pays}
    assert screen.pays(1) is pays and screen.pays(8) is pays
    assert HeadScreen.valid_choice(json.loads(json.dumps(choice)))  # as the cache keeps it
    assert choice["milliseconds"]["rows"] == {"columns": 1000.0, "rows": 900.0, "screen": 1000 * screen_share,
                                               "fp32 head": 1000.0}  # fmt: skip
    other = HeadScreen(near_tie_head())
    REAL_ADOPT(other, choice)
    assert other.choice() == {key: value for key, value in choice.items() if key != "milliseconds"}


def test_measure_times_every_kernel_and_both_heads_on_this_cpu():
    """The real timings: every kernel for one row, all but `mv` for 8, the screen and the fp32 head for
    both, and a choice the cache can keep whose kernels stay within the bound."""
    from gptlab.generate import _BF16_PRODUCTS

    screen = HeadScreen(near_tie_head())
    choice = screen.measure(repeats=2)
    assert HeadScreen.valid_choice(choice)
    times = choice["milliseconds"]
    assert set(times["one row"]) == {*_BF16_PRODUCTS, "screen", "fp32 head"}
    assert set(times["rows"]) == {*_BF16_PRODUCTS, "screen", "fp32 head"} - {"vector"}
    assert all(t > 0 for count in times.values() for t in count.values())
    assert times["one row"][screen.one_row_product] == min(times["one row"][name] for name in _BF16_PRODUCTS)
    assert screen.holds()


def test_the_head_choice_is_measured_once_per_machine_and_kept_in_the_cache(tmp_path, monkeypatch):
    """`head_screen` measures a head shape once and keeps the choice in GPTLAB_CACHE; a later process
    (a fresh screen) adopts it without measuring; an entry this version cannot read is measured again."""
    import gptlab.generate
    import gptlab.machine

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)
    measured = []

    def counted(screen, repeats=5):
        measured.append(screen.weight.shape)
        return HeadScreen.choice(screen)

    monkeypatch.setattr(HeadScreen, "measure", counted)
    assert head_screen(varied_gpt().eval(), greedy()) is not None
    assert head_screen(varied_gpt().eval(), greedy()) is not None  # another model, the same shape
    assert len(measured) == 1
    kept = json.loads((tmp_path / "decoding.json").read_text())
    ((key, choice),) = kept.items()
    assert "threads" in key and "head " in key and HeadScreen.valid_choice(choice)
    kept[key]["rows_product"] = "a kernel of a later version"
    (tmp_path / "decoding.json").write_text(json.dumps(kept))
    assert head_screen(varied_gpt().eval(), greedy()) is not None
    assert len(measured) == 2


def test_a_batch_takes_the_screen_for_the_row_counts_where_it_pays(monkeypatch):
    """Where the screen pays for several rows only (as on a Zen 5 EPYC), one row decodes through the fp32
    head, two through the screen, and one again after the other leaves; the tokens as if alone."""
    import gptlab.machine

    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)

    def for_rows_only(screen, choice):
        REAL_ADOPT(screen, choice)
        screen.pays_for = {"one row": False, "rows": True}

    monkeypatch.setattr(HeadScreen, "adopt", for_rows_only)
    model = varied_gpt().eval()
    config = greedy(max_new_tokens=12, batch_size=2)
    alone = generate_ids(model, [[1, 2, 3]], config)[0]
    with torch.inference_mode():
        batch = LiveBatch(model, config)
        tokens = [batch.join([[1, 2, 3]])[0]]
        assert batch.screen is None and batch.head is not None
        batch.join([[9, 8]])
        assert batch.screen is not None and batch.head is None
        for step in range(11):
            if step == 4:
                batch.leave([1])
                assert batch.screen is None and batch.head is not None
            tokens.append(batch.step()[0])
    assert tokens == alone


def grouping(groups: int, rows_too: bool = False) -> dict:
    """A measured `_groups_choice`: one row through `groups` groups of columns (0: `F.linear`), and
    whether several rows take them too."""
    return {"one_row_groups": groups, "rows_too": rows_too}


def test_block_columns_are_the_blocks_weights_stored_in_out_where_that_pays(monkeypatch):
    import gptlab.generate
    from gptlab.generate import block_columns

    model = varied_gpt().eval()
    linears = [(b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj) for b in model.blocks]

    def ungrouped(c):  # (k, in, n) back to (in, k n)
        return c.transpose(0, 1).reshape(c.shape[1], -1)

    monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights: grouping(2, True))
    columns, rows_too = block_columns(model)
    assert len(columns) == len(model.blocks) and rows_too
    for layer, copies in zip(linears, columns, strict=True):
        for linear, c in zip(layer, copies, strict=True):
            assert c.shape == (2, linear.in_features, linear.out_features // 2) and c.is_contiguous()
            assert torch.equal(ungrouped(c), linear.weight.t())
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.data[3, 5] += 1.0  # `.data`: no version bump, the checksum sees it
    assert torch.equal(ungrouped(block_columns(model).layers[0][2]), model.blocks[0].mlp.fc.weight.t())
    monkeypatch.setattr(
        gptlab.generate, "_groups_choice", lambda weights: grouping(5, False)
    )  # divides no width: padded
    assert not block_columns(model).rows_too
    for layer, copies in zip(linears, block_columns(model).layers, strict=True):
        for linear, c in zip(layer, copies, strict=True):
            out = linear.out_features
            assert c.shape == (5, linear.in_features, -(-out // 5))
            assert torch.equal(ungrouped(c)[:, :out], linear.weight.t()) and not ungrouped(c)[:, out:].any()
    monkeypatch.setattr(gptlab.generate, "BLOCK_COLUMNS_MAX_BYTES", 1000)
    assert block_columns(model) is None  # copies too large to keep
    monkeypatch.undo()
    monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights: grouping(0))
    assert block_columns(model) is None  # not faster on this CPU
    monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights: grouping(2))
    assert block_columns(model.to(torch.bfloat16)) is None  # fp32 weights only


def test_the_block_layout_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    import gptlab.generate
    from gptlab.generate import block_columns

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # so that 2 groups are a candidate too
    measured = []
    real = gptlab.generate._measure_groups

    def counted(weights, repeats=15):
        measured.append(len(weights))
        return real(weights, repeats=2)

    monkeypatch.setattr(gptlab.generate, "_measure_groups", counted)
    first = block_columns(varied_gpt().eval())
    second = block_columns(varied_gpt().eval())  # another model of the same shapes
    assert measured == [4 * len(varied_gpt().blocks)]
    assert (first is None) == (second is None)
    (key, choice), *others = json.loads((tmp_path / "decoding.json").read_text()).items()
    assert not others and "float32 weights " in key and choice["one_row_groups"] in (0, 1, 2)
    one_row, rows = choice["milliseconds"]["one row"], choice["milliseconds"]["8 rows"]
    assert set(one_row) == {"F.linear", "1 groups", "2 groups"}
    groups = choice["one_row_groups"]
    assert groups == 0 or one_row[f"{groups} groups"] == min(one_row.values())
    assert set(rows) == {"F.linear"} | ({f"{groups} groups"} if groups else set())
    assert choice["rows_too"] is (groups > 0 and rows[f"{groups} groups"] < 0.95 * rows["F.linear"])


@pytest.mark.parametrize("groups", [0, 1, 2, 3])
def test_the_decoding_head_computes_the_logits_in_any_grouping(groups, monkeypatch):
    """The head's columns in 1, 2 or 3 groups (of 257 tokens: the last group padded) give the head's
    logits for one row and for several, and greedy decoding through them the same tokens as `F.linear`
    (0 groups: the head module itself)."""
    import gptlab.generate
    import gptlab.machine

    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: False)  # the fp32 head, not the screen
    model = varied_gpt().eval()
    hidden = torch.randn(5, model.config.n_embd)
    monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights: grouping(0))
    plain = generate_ids(model, [[1, 2, 3], [7]], greedy(max_new_tokens=20))
    monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights: grouping(groups))
    head = decoding_head(model)
    assert (head is model.lm_head) is (groups == 0)
    for rows in (1, 5):
        logits = head(hidden[:rows])
        assert logits.shape == (rows, model.config.vocab_size)
        assert torch.allclose(logits, model.lm_head(hidden[:rows]), atol=1e-5)
    assert generate_ids(model, [[1, 2, 3], [7]], greedy(max_new_tokens=20)) == plain


def test_decoding_through_block_columns_gives_the_same_tokens(monkeypatch):
    import gptlab.generate

    model = varied_gpt().eval()
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    config = greedy(max_new_tokens=30, batch_size=1)
    monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights: grouping(0))
    plain = generate_ids(model, prompts, config)
    with torch.inference_mode():
        assert LiveBatch(model, config).one_position.column_layers is None
    for groups, rows_too in ((1, False), (2, True), (3, True)):
        choice = grouping(groups, rows_too)
        monkeypatch.setattr(gptlab.generate, "_groups_choice", lambda weights, choice=choice: choice)
        with torch.inference_mode():
            step = LiveBatch(model, config).one_position
            assert step.column_layers is not None and step.rows_too is rows_too
        assert generate_ids(model, prompts, config) == plain
        assert generate_ids(model, prompts, dataclasses.replace(config, batch_size=2)) == plain


SIX_TOKENS = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0], [0.3, 0.9]])


class PushedScreen(HeadScreen):
    """bf16 logits pushed by E = 0.5 up and down in turn, as far as the bound allows."""

    def approximate(self, hidden):
        push = torch.tensor([0.5, -0.5]).repeat(len(self.weight) // 2)
        return hidden @ self.weight.t() + push, torch.full((len(hidden),), 0.5)


def test_screened_plain_sampling_follows_the_fp32_distribution_even_from_a_wrong_proposal(monkeypatch):
    """Plain sampling draws from the bf16 logits l' and keeps a draw with probability exp((l - l' - E) / T):
    kept tokens follow softmax(l / T) wherever l' lies within E. Here l' is pushed E up and down on
    purpose, so that the proposal alone is far off (a screen that kept every draw fails)."""
    import gptlab.generate

    monkeypatch.setattr(gptlab.generate, "SCREEN_SAMPLING_ROUNDS", 200)  # no row left for the fp32 fallback
    weight = SIX_TOKENS
    hidden = torch.tensor([[0.7, 0.4]]).expand(40_000, 2)
    config = GenerationConfig(temperature=0.8)
    target = ((hidden[0] @ weight.t()) / 0.8).softmax(dim=0)
    proposal = ((PushedScreen(weight).approximate(hidden[:1])[0][0]) / 0.8).softmax(dim=0)
    assert (proposal - target).abs().max() > 0.08
    tokens = PushedScreen(weight).next_tokens(hidden, [config] * len(hidden), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
    assert (frequencies - target).abs().max() < 0.008  # about 3 standard deviations at 40,000 draws


def test_screened_sampling_falls_back_to_fp32_when_draws_are_rarely_kept():
    screen = HeadScreen(near_tie_head())
    hidden = torch.randn(6, 24) * 10
    cold = GenerationConfig(temperature=1e-4)  # keeps a draw with probability exp(-2E / T) at worst: nearly never
    tokens = screen.next_tokens(hidden, [cold] * 6, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, (hidden @ screen.weight.t()).argmax(dim=-1))


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(temperature=0.9, top_k=5),
        GenerationConfig(temperature=1.3, min_p=0.05),
        GenerationConfig(temperature=0.7, top_k=40, min_p=0.1),
        GenerationConfig(temperature=1.0, top_k=1000),  # more than the vocabulary
    ],
)
@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_screened_top_k_and_min_p_draw_what_fp32_logits_draw(config, jitter):
    """Every token top-k or min-p may keep gets its fp32 logit, so the draw is fp32's, number for number:
    also when the approximate logits are anywhere within their bound (here jittered by up to E = 0.3,
    which reorders the tokens near the k-th)."""

    class Jittered(HeadScreen):
        def approximate(self, hidden):
            noise = torch.rand(len(hidden), len(self.weight), generator=torch.Generator().manual_seed(2)) * 2 - 1
            return hidden @ self.weight.t() + jitter * noise, torch.full((len(hidden),), max(jitter, 1e-3))

    screen = Jittered(near_tie_head())
    hidden = torch.randn(64, 24, generator=torch.Generator().manual_seed(3)) * 6
    fp32 = sample_next(hidden @ screen.weight.t(), config, None, torch.Generator().manual_seed(5))
    screened = screen.next_tokens(hidden, [config] * 64, torch.Generator().manual_seed(5))
    assert torch.equal(screened, fp32)
    assert len(set(fp32.tolist())) > 10  # varied draws, not one token everywhere


def test_screen_serves_rows_with_settings_of_their_own():
    screen = HeadScreen(near_tie_head())
    hidden = torch.randn(6, 24, generator=torch.Generator().manual_seed(4)) * 6
    top_k, plain = GenerationConfig(temperature=0.9, top_k=5), GenerationConfig(temperature=0.9)
    settings = [greedy(), top_k, plain, greedy(), top_k, plain]
    tokens = screen.next_tokens(hidden, settings, torch.Generator().manual_seed(0))
    argmax = (hidden @ screen.weight.t()).argmax(dim=-1)
    assert tokens[[0, 3]].tolist() == argmax[[0, 3]].tolist()
    top5 = (hidden @ screen.weight.t()).topk(5, dim=-1).indices
    assert all(tokens[i] in top5[i] for i in (1, 4))


def test_sampled_decoding_takes_the_screen_and_draws_as_fp32_with_top_k(monkeypatch):
    import gptlab.machine

    model = varied_gpt()
    prompts = [[1, 2, 3], [9], [40, 41, 42, 43]]
    config = GenerationConfig(temperature=3.0, top_k=8, max_new_tokens=25, stop_at_eot=False, seed=11)
    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: False)
    plain = generate_ids(model, prompts, config)
    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)
    with torch.inference_mode():
        assert LiveBatch(model.eval(), GenerationConfig(temperature=0.8)).screen is not None
        assert LiveBatch(model.eval(), GenerationConfig(temperature=0.8, top_p=0.95)).screen is None
    assert generate_ids(model, prompts, config) == plain
    assert len({token for row in plain for token in row}) > 5


@pytest.mark.parametrize("penalty", [1.8, 0.6])
def test_screen_applies_the_repetition_penalty_as_fp32_does(penalty, monkeypatch):
    """The penalty moves the bf16 and fp32 logits alike, and the bound by max(p, 1/p): greedy and top-k
    decoding through the screen give fp32's tokens, and plain sampling still follows fp32's distribution."""
    import gptlab.generate
    import gptlab.machine

    model = varied_gpt()
    prompts = [[1, 2, 3, 1, 2], [9], [40, 41, 42, 43, 40]]
    for config in (
        greedy(max_new_tokens=20, repetition_penalty=penalty),
        GenerationConfig(
            temperature=2.0, top_k=6, repetition_penalty=penalty, max_new_tokens=20, stop_at_eot=False, seed=3
        ),
    ):
        monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: False)
        plain = generate_ids(model, prompts, config)
        monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)
        with torch.inference_mode():
            assert LiveBatch(model.eval(), config).screen is not None
        assert generate_ids(model, prompts, config) == plain
    assert plain != generate_ids(model, prompts, dataclasses.replace(config, repetition_penalty=1.0))

    monkeypatch.setattr(gptlab.generate, "SCREEN_SAMPLING_ROUNDS", 400)  # no row left for the fp32 fallback
    hidden = torch.tensor([[1.4, 0.8]]).expand(40_000, 2)
    logits = hidden[0] @ SIX_TOKENS.t()
    seen = torch.zeros(40_000, 6, dtype=torch.bool)
    seen[:, [1, 4]] = True  # a positive logit and a negative one
    config = GenerationConfig(temperature=1.0, repetition_penalty=penalty)
    expected = penalize_repetition(logits[None], seen[:1], penalty)[0].softmax(dim=0)
    assert (expected - logits.softmax(dim=0)).abs().max() > 0.1  # the penalty matters
    tokens = PushedScreen(SIX_TOKENS).next_tokens(
        hidden, [config] * len(hidden), torch.Generator().manual_seed(0), seen
    )
    frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
    assert (frequencies - expected).abs().max() < 0.008


def test_greedy_decoding_through_the_screen_equals_fp32(model, monkeypatch):
    import gptlab.machine

    prompts = [[1, 2, 3], [9], [40, 41, 42, 43]]
    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: False)
    assert head_screen(model, greedy()) is None
    plain = generate_ids(model, prompts, greedy(max_new_tokens=30))
    monkeypatch.setattr(gptlab.machine, "cpu_has_bf16", lambda: True)
    assert isinstance(head_screen(model, greedy()), HeadScreen)
    assert head_screen(model, GenerationConfig(temperature=0.7, top_p=0.9)) is None  # the nucleus needs every logit
    assert generate_ids(model, prompts, greedy(max_new_tokens=30)) == plain
    assert generate_ids(model, prompts, greedy(max_new_tokens=30, batch_size=1)) == plain
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # an in-place update makes a new screen
    hidden = torch.randn(5, 32)
    assert torch.equal(head_screen(model, greedy()).greedy(hidden), model.lm_head(hidden).argmax(dim=-1))


# ---------------------------------------------------------------- decoding strategies


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    assert torch.isfinite(keep_top_k(logits, 2)).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("p, kept", [(0.5, 1), (0.8, 2), (0.81, 3), (0.96, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    order = [1, 3, 0, 2]  # most likely first
    mask = torch.isfinite(keep_top_p(probs.log(), p))[0]
    assert [bool(mask[i]) for i in order] == [True] * kept + [False] * (4 - kept)


def nucleus_by_full_sort(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The reference: sort every token, keep those before which the mass has not reached p."""
    probs = logits.softmax(dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    kept = ordered.cumsum(dim=-1) - ordered < p
    return torch.zeros_like(kept).scatter(-1, order, kept)


@pytest.mark.parametrize("scale", [10.0, 3.0, 0.5])  # nuclei of a few, hundreds to thousands, and most tokens
def test_top_p_on_a_large_vocabulary_equals_sorting_every_token(scale):
    logits = torch.randn(3, 20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    logits[1] *= 3  # rows of different sharpness in one batch
    for p in (0.3, 0.9, 0.99):
        kept = torch.isfinite(keep_top_p(logits, p))
        assert torch.equal(kept, nucleus_by_full_sort(logits, p))  # float64: no ties among 20,000 values
    assert 0 < kept.sum() < kept.numel()


def test_top_p_keeps_tokens_tied_with_the_least_likely_one_it_keeps():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    probs = logits.softmax(dim=-1)[0]
    reaching = (probs[0] + probs[1]).item() + 1e-6  # the nucleus ends inside the tie of three
    assert torch.isfinite(keep_top_p(logits, reaching)).tolist() == [[True, True, True, True, False]]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.isfinite(keep_min_p(probs.log(), 0.25)).tolist() == [[True, True, True, False]]


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, True]])
    penalized = penalize_repetition(logits, seen, 2.0)
    assert penalized.tolist() == [[1.0, 1.5, -2.0]]
    assert sample_next(logits, GenerationConfig(temperature=0, repetition_penalty=2.0), seen).item() == 1


@pytest.mark.parametrize("fields", [dict(top_k=1), dict(top_p=0.01), dict(min_p=0.99)])
def test_narrow_sampling_equals_greedy(model, fields):
    prompts = [[1, 2, 3], [9]]
    sampled = generate_ids(model, prompts, GenerationConfig(max_new_tokens=20, stop_at_eot=False, seed=0, **fields))
    assert sampled == generate_ids(model, prompts, greedy(max_new_tokens=20))


def test_sampling_follows_the_tempered_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, GenerationConfig(temperature=1.0), generator=generator), minlength=3)
    assert torch.allclose(counts / 20000, probs, atol=0.015)
    hot = sample_next(logits, GenerationConfig(temperature=2.0), generator=generator)
    expected = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(torch.bincount(hot, minlength=3) / 20000, expected, atol=0.015)


def test_draw_follows_each_rows_probabilities_and_never_picks_a_zero():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # rows need not sum to 1
    drawn = torch.stack([draw(probs, generator) for _ in range(20000)])  # (20000, 2)
    first = torch.bincount(drawn[:, 0], minlength=5) / 20000
    assert torch.allclose(first, torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), atol=0.015)
    assert first[1] == 0 and first[4] == 0  # not even the last entry, where rounding could land
    assert (drawn[:, 1] == 4).all()
    tiny = torch.full((1, 50257), 1e-30)
    tiny[0, 123] = 1.0
    assert draw(tiny, generator).item() == 123


@pytest.mark.parametrize("row", [[float("nan"), 1.0], [0.0, 0.0], [0.5, -0.1], [float("inf"), 1.0]])
def test_draw_refuses_rows_that_are_not_probabilities(row):
    with pytest.raises(GptlabError, match="cannot sample"):
        draw(torch.tensor([[0.5, 0.5], row]))


def test_seed_makes_sampling_reproducible():
    model = tiny_gpt()
    config = GenerationConfig(max_new_tokens=30, temperature=1.5, stop_at_eot=False, seed=7)
    first = generate_ids(model, [[1, 2]], config)
    assert generate_ids(model, [[1, 2]], config) == first
    other = generate_ids(model, [[1, 2]], GenerationConfig(max_new_tokens=30, temperature=1.5, seed=8))
    assert other != first


# ---------------------------------------------------------------- text, stop strings and streaming


def test_stop_string_split_across_tokens_stops_and_is_not_included():
    scripted, tokenizer = script("abcdefgh"), ByteTokenizer()
    config = GenerationConfig(temperature=0, stop=["def"])
    assert generate(scripted, tokenizer, "x", config) == ["abc"]
    pieces = list(stream(scripted, tokenizer, "x", config))
    assert "".join(pieces) == "abc" and pieces == ["a", "b", "c"]


def test_partial_stop_string_is_held_back_then_released():
    scripted, tokenizer = script("abcdefgh"), ByteTokenizer()
    pieces = list(stream(scripted, tokenizer, "x", GenerationConfig(temperature=0, stop=["dex"])))
    assert pieces == ["a", "b", "c", "def", "g", "h"]


def test_earliest_of_several_stop_strings_wins():
    scripted = script("abcdefgh")
    assert generate(scripted, ByteTokenizer(), "x", GenerationConfig(temperature=0, stop=["gh", "cd", "b"])) == ["a"]


def test_stream_holds_back_characters_split_across_tokens():
    text = "é€z"  # 2 + 3 + 1 bytes, one token per byte
    data = b"x" + text.encode()
    scripted = ScriptedModel(dict(pairwise(data)))
    pieces = list(stream(scripted, ByteTokenizer(), "x", GenerationConfig(temperature=0)))
    assert pieces == ["é", "€", "z"]


def test_end_of_text_ends_a_row_and_is_not_included():
    scripted = script("abc")
    assert generate(scripted, ByteTokenizer(), ["x"], GenerationConfig(temperature=0)) == ["abc"]
    assert generate(scripted, ByteTokenizer(), ["x"], greedy(max_new_tokens=4)) == ["abc<|endoftext|>"]


def test_generate_batches_prompts_of_different_lengths_with_stop_strings(model):
    tokenizer = ByteTokenizer()
    prompts = ["Once upon", "a", "The quick brown fox"]
    config = greedy(max_new_tokens=30)
    batched = generate(model, tokenizer, prompts, config)
    assert batched == [generate(model, tokenizer, p, config)[0] for p in prompts]
    stop = batched[0][3:5]
    stopped = generate(model, tokenizer, prompts, greedy(max_new_tokens=30, stop=[stop]))
    assert stopped[0] == batched[0][: batched[0].index(stop)]


def test_empty_prompt_starts_from_end_of_text():
    scripted = ScriptedModel({EOT: ord("Q"), ord("Q"): ord("!")})
    assert generate(scripted, ByteTokenizer(), "", GenerationConfig(temperature=0)) == ["Q!"]
    assert scripted.inputs[0].tolist() == [[EOT]]


def test_long_prompt_keeps_the_most_recent_tokens_with_a_warning():
    scripted = script("ab", start="z")
    prompt = "y" * 100 + "z"
    with pytest.warns(GenerationWarning, match="keeping the last 64") as caught:
        assert generate(scripted, ByteTokenizer(), prompt, GenerationConfig(temperature=0)) == ["ab"]
    assert scripted.inputs[0].shape == (1, 64)
    assert caught[0].filename == __file__  # the warning names the caller's line, not the library's


def test_long_prompt_is_refused_when_asked():
    scripted = script("ab")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(GptlabError, match="context length is 64"):
            generate(scripted, ByteTokenizer(), "y" * 65, GenerationConfig(prompt_overflow="error"))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature must be >= 0 .* and finite, got nan"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(prompt_overflow="drop"), "prompt_overflow"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_generation_config_is_a_clear_error(fields, message):
    with pytest.raises(GptlabError, match=message):
        GenerationConfig(**fields)


def test_token_ids_outside_the_vocabulary_are_refused(model):
    with pytest.raises(GptlabError, match="outside the model's vocabulary"):
        generate_ids(model, [[1, 999]], greedy())


def test_tokenizer_larger_than_the_model_is_refused():
    scripted = script("a")
    scripted.config = GPTConfig(vocab_size=100, context_length=64, n_layer=1, n_head=1, n_embd=4)
    with pytest.raises(GptlabError, match="tokenizer has 257 tokens"):
        generate(scripted, ByteTokenizer(), "x", greedy())


# ---------------------------------------------------------------- chat


def test_chat_formats_turns_with_the_template_and_keeps_history():
    tokenizer = ByteTokenizer()
    scripted = ScriptedModel({ord("\n"): ord("O"), ord("O"): ord("K")}, context_length=512)
    chat = Chat(scripted, tokenizer, GenerationConfig(temperature=0, max_new_tokens=10), "alpaca")
    assert "".join(chat.send("Say ok")) == "OK"
    assert tokenizer.decode(scripted.inputs[0][0].tolist()) == format_instruction("alpaca", "Say ok")
    assert "".join(chat.send("Again")) == "OK"
    second_prompt = tokenizer.decode(scripted.inputs[-3][0].tolist())
    assert (
        "### Instruction:\nSay ok\n\n### Response:\nOK\n\n### Instruction:\nAgain\n\n### Response:\n" in second_prompt
    )
    chat.reset()
    chat_inputs = len(scripted.inputs)
    "".join(chat.send("Fresh"))
    assert tokenizer.decode(scripted.inputs[chat_inputs][0].tolist()) == format_instruction("alpaca", "Fresh")


def test_chat_history_is_trimmed_to_fit_the_context():
    tokenizer = ByteTokenizer()
    scripted = ScriptedModel({ord("\n"): ord("O"), ord("O"): ord("K")}, context_length=256)
    chat = Chat(scripted, tokenizer, GenerationConfig(temperature=0, max_new_tokens=8), "chat")
    for i in range(20):
        assert "".join(chat.send(f"message number {i}")) == "OK"
    prompt = tokenizer.decode(scripted.inputs[-3][0].tolist())
    assert len(prompt) <= 256 - 8
    assert prompt.endswith("<|user|>\nmessage number 19\n<|assistant|>\n")
    assert "message number 0\n" not in prompt


def test_chat_without_template_continues_the_transcript_each_message_on_its_own_line():
    tokenizer = ByteTokenizer()
    scripted = ScriptedModel({ord("a"): ord("b"), ord("c"): ord("d")})
    chat = Chat(scripted, tokenizer, GenerationConfig(temperature=0), None)
    assert "".join(chat.send("a")) == "b"
    assert "".join(chat.send("c")) == "d"
    assert tokenizer.decode(scripted.inputs[-2][0].tolist()) == "ab\nc"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"top_k": 2.5}, "top_k must be a whole number or none, got 2.5"),
        ({"top_k": True}, "top_k must be a whole number or none, got True"),
        ({"seed": "1"}, "seed must be a whole number or none, got '1'"),
        ({"temperature": "0.5"}, "temperature must be a finite number, got '0.5'"),
        ({"use_cache": "no"}, "use_cache must be true or false, got 'no'"),
        ({"seed": 2**64}, "seed must be from 0 to 2**63 - 1"),
        ({"seed": -1}, "seed must be from 0 to 2**63 - 1"),
        ({"stop": ["a", 1]}, "stop must be a list of texts, got ['a', 1]"),  # no command-line wording
    ],
)
def test_generation_config_built_in_python_refuses_wrong_types_by_name(fields, message):
    with pytest.raises(GptlabError, match=re.escape(message)):
        GenerationConfig(**fields)


def test_a_stop_given_as_one_text_is_one_stop_string(model):
    tokenizer = ByteTokenizer()
    assert GenerationConfig(stop="xq").stop == ["xq"] and GenerationConfig(stop=("a,b", "c")).stop == ["a,b", "c"]
    greedy = GenerationConfig(max_new_tokens=8, temperature=0.0, stop_at_eot=False)
    text = generate(model, tokenizer, "ab", greedy)[0]
    # A stop string the completion never holds, though it holds one of its characters: nothing stops.
    stop = "\x00" + text[-1]
    assert generate(model, tokenizer, "ab", GenerationConfig(**{**greedy.__dict__, "stop": stop}))[0] == text


def test_a_tiny_temperature_samples_like_greedy_instead_of_failing(model):
    tokenizer = ByteTokenizer()
    greedy = generate(model, tokenizer, "ab", GenerationConfig(max_new_tokens=6, temperature=0.0, stop_at_eot=False))
    for temperature in (1e-30, 1e-45, 1e-46, 1e-300):  # the last two are 0 in fp32
        tiny = GenerationConfig(max_new_tokens=6, temperature=temperature, stop_at_eot=False, seed=0)
        assert generate(model, tokenizer, "ab", tiny) == greedy


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, t: generate(m, t, None), "expected a text or a list of texts, got None"),
        (lambda m, t: generate(m, t, ["ok", 3]), "expected a text or a list of texts"),
        (lambda m, t: generate(m, t, "x", {"max_new_tokens": 5}), "config must be a GenerationConfig, got dict"),
        (lambda m, t: generate(m, t, b"Hi"), "expected a text or a list of texts, got b'Hi'"),
        (lambda m, t: generate_ids(m, ["The"]), "each a list of token ids; got a prompt 'The'"),
        (lambda m, t: generate_ids(m, [1, 2, 3]), "each a list of token ids; got a prompt 1"),
        (lambda m, t: generate_ids(m, torch.tensor([1, 2, 3])), "each a list of token ids; got a prompt tensor(1)"),
        (lambda m, t: generate_ids(m, [[1.5, 2]]), "each a list of token ids; got a prompt [1.5, 2]"),
        (lambda m, t: m(torch.tensor([1, 2, 3])), "got torch.int64 of shape (3,); one sequence is idx[None]"),
        (
            lambda m, t: m(torch.ones(1, 3)),
            "the model takes token ids (integers) of shape (batch, time), got torch.float32",
        ),
    ],
)
def test_python_api_misuse_is_a_gptlab_error_naming_it(model, call, message):
    with pytest.raises(GptlabError, match=re.escape(message)):
        call(model, ByteTokenizer())
