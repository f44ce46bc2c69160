import pytest
import torch
import torch.nn.functional as F

from gptlab import model as model_module
from gptlab.config import GPTConfig, get_preset
from gptlab.errors import GptlabError
from gptlab.interop import state_dict_from_hf, state_dict_to_hf
from gptlab.model import GPT, DecodeStep, KVCache, _attention_by_products, _products_pay

transformers = pytest.importorskip("transformers")

CONFIGS = [
    GPTConfig(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=32),
    GPTConfig(vocab_size=128, context_length=48, n_layer=3, n_head=4, n_embd=64),
    GPTConfig(vocab_size=50, context_length=16, n_layer=1, n_head=1, n_embd=16, tie_embeddings=True),
]


def hf_model(config: GPTConfig):
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon, tie_word_embeddings=config.tie_embeddings, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random non-zero biases so the conversion of every tensor is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def gptlab_from_hf(model, config):
    ours = GPT(config).eval()
    ours.load_state_dict(state_dict_from_hf(model.state_dict(), config), strict=True)
    return ours


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_logits_equal_transformers_gpt2(config, seq_len):
    hf = hf_model(config)
    ours = gptlab_from_hf(hf, config)
    idx = torch.randint(0, config.vocab_size, (2, seq_len))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-5


def test_parameter_count_equals_transformers():
    for config in CONFIGS:
        hf = hf_model(config)
        assert GPT(config).num_parameters() == hf.num_parameters()


def test_state_dict_round_trip_through_transformers_layout():
    config = CONFIGS[1]
    model = GPT(config)
    back = state_dict_from_hf(state_dict_to_hf(model.state_dict(), config), config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("chunks", [[12], [5, 1, 1, 1, 4], [1] * 12])
def test_kv_cached_decoding_equals_full_forward(chunks):
    config = CONFIGS[1]
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (3, sum(chunks)))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(config, batch_size=3)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(idx[:, start : start + size], cache=cache))
            start += size
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_left_padded_batch_matches_rows_alone():
    config = CONFIGS[1]
    model = GPT(config).eval()
    short = torch.randint(0, config.vocab_size, (1, 4))
    long = torch.randint(0, config.vocab_size, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with torch.no_grad():
        cache = KVCache(config, batch_size=2)
        logits = model(batch, attention_mask=mask, cache=cache)
        step = torch.tensor([[3], [7]])
        next_logits = model(step, cache=cache)
        alone_short = model(torch.cat([short, step[:1]], 1))
        alone_long = model(torch.cat([long, step[1:]], 1))
        no_cache = model(batch, attention_mask=mask)
    assert torch.allclose(logits[0, -1], alone_short[0, -2], atol=1e-5)
    assert torch.allclose(next_logits[0, -1], alone_short[0, -1], atol=1e-5)
    assert torch.allclose(next_logits[1, -1], alone_long[0, -1], atol=1e-5)
    assert torch.allclose(no_cache[0, -1], alone_short[0, -2], atol=1e-5)
    assert torch.isfinite(logits).all()


def varied_decoder(bias: bool) -> GPT:
    config = GPTConfig(vocab_size=97, context_length=32, n_layer=3, n_head=4, n_embd=32, bias=bias, qkv_bias=bias)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so each is used where it belongs
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model


def block_columns_of(model: GPT, groups: int) -> list[list[torch.Tensor]]:
    from gptlab.generate import _columns

    return [
        [_columns(linear.weight, groups) for linear in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]
        for b in model.blocks
    ]


@pytest.mark.parametrize("bias", [True, False])
def test_decode_step_equals_the_modules_bit_for_bit(bias):
    """The decoding loop's module-free step: plain and padded batches, with and without biases."""
    model = varied_decoder(bias)
    config = model.config
    step = DecodeStep(model)
    for rows, padded in ((1, False), (3, False), (3, True)):
        prompt = torch.randint(0, config.vocab_size, (rows, 6))
        mask = torch.ones_like(prompt)
        if padded:
            mask[1, :2], mask[2, :5] = 0, 0
        modules, steps = KVCache(config, rows, 20), KVCache(config, rows, 20)
        with torch.inference_mode():
            model.hidden_states(prompt, mask, None, modules), model.hidden_states(prompt, mask, None, steps)
            for _ in range(8):
                tokens = torch.randint(0, config.vocab_size, (rows,))
                expected = model.hidden_states(tokens[:, None], None, None, modules)[:, -1]
                assert torch.equal(step(tokens, steps), expected), (rows, padded)
        assert steps.length == modules.length == 14
        assert torch.equal(steps.keys, modules.keys) and torch.equal(steps.next_position, modules.next_position)


@pytest.mark.parametrize(
    "bias, groups, rows_too", [(True, 1, False), (False, 1, True), (True, 2, True), (False, 4, False), (True, 5, True)]
)
def test_decode_step_through_the_weights_stored_in_out(bias, groups, rows_too):
    """With the blocks' weights also stored (in, out), in groups of columns (5 groups padded), one-row
    steps, and with `rows_too` those of several rows, multiply those: the same hidden states to fp32's
    rounding, and the same cache; steps of several rows without `rows_too` keep the modules' bits."""
    model = varied_decoder(bias)
    config = model.config
    step, plain = DecodeStep(model, block_columns_of(model, groups), rows_too), DecodeStep(model)
    with torch.inference_mode():
        for rows in (1, 3):
            prompt = torch.randint(0, config.vocab_size, (rows, 6))
            caches = [KVCache(config, rows, 20) for _ in range(2)]
            for cache in caches:
                model.hidden_states(prompt, None, None, cache)
            for _ in range(8):
                tokens = torch.randint(0, config.vocab_size, (rows,))
                got, expected = step(tokens, caches[0]), plain(tokens, caches[1])
                if rows == 1 or rows_too:
                    assert torch.allclose(got, expected, atol=1e-5)
                else:
                    assert torch.equal(got, expected)
            assert torch.allclose(caches[0].keys, caches[1].keys, atol=1e-5)
        # the copies are what the steps multiply: zeroed ones change one row's state, and 3 rows' with rows_too
        zeroed_columns = [[torch.zeros_like(c) for c in layer] for layer in block_columns_of(model, groups)]
        zeroed = DecodeStep(model, zeroed_columns, rows_too)
        for rows in (1, 3):
            caches = [KVCache(config, rows, 8) for _ in range(2)]
            tokens = torch.randint(0, config.vocab_size, (rows,))
            assert torch.equal(zeroed(tokens, caches[0]), plain(tokens, caches[1])) is (rows == 3 and not rows_too)
    with pytest.raises(ValueError):  # a list for every block
        DecodeStep(model, block_columns_of(model, groups)[:-1])


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_project_through_grouped_columns_equals_linear(groups):
    """`_project` through W^T's columns in groups (7 outputs: 2 and 3 groups padded), with and without
    a bias, for one row and for several."""
    from gptlab.generate import _columns
    from gptlab.model import _grouped, _project

    weight, bias, x = torch.randn(7, 4), torch.randn(7), torch.randn(3, 4)
    columns = _columns(weight, groups)
    assert columns.shape == (groups, 4, -(-7 // groups))
    for rows in (1, 3):
        expected = torch.nn.functional.linear(x[:rows], weight, bias)
        assert torch.allclose(_project(x[:rows], weight, _grouped(bias, columns), columns), expected, atol=1e-6)
        assert torch.allclose(_project(x[:rows], weight, None, columns), x[:rows] @ weight.t(), atol=1e-6)
    assert torch.equal(_project(x, weight, bias, None), torch.nn.functional.linear(x, weight, bias))


def test_decode_step_fits_only_a_plain_model_in_evaluation():
    from gptlab.config import LoRAConfig
    from gptlab.lora import apply_lora

    model = GPT(CONFIGS[0]).eval()
    assert DecodeStep.fits(model)
    assert not DecodeStep.fits(model.train())
    hooked = GPT(CONFIGS[0]).eval()
    hooked.blocks[1].mlp.register_forward_hook(lambda module, args, out: out * 2)
    assert not DecodeStep.fits(hooked)
    adapted = apply_lora(GPT(CONFIGS[0]), LoRAConfig(rank=2)).eval()
    assert not DecodeStep.fits(adapted)
    assert not DecodeStep.fits(torch.nn.Linear(2, 2))
    model.blocks[0].train()  # one module still training (its dropout would be skipped)
    assert not DecodeStep.fits(model)
    model.eval().blocks[1].mlp.forward = lambda x: x  # a forward patched onto one instance
    assert not DecodeStep.fits(model)
    del model.blocks[1].mlp.forward
    model.blocks = model.blocks[:1]  # fewer blocks than the config (and the cache) has layers
    assert not DecodeStep.fits(model)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:  # a global hook, as profilers and tracers install
        assert not DecodeStep.fits(GPT(CONFIGS[0]).eval())
    finally:
        handle.remove()
    assert DecodeStep.fits(GPT(CONFIGS[0]).eval())


def test_a_cache_made_without_gradients_serves_a_forward_with_them():
    config = CONFIGS[2]
    model = GPT(config)
    with torch.no_grad():
        cache = KVCache(config, batch_size=1)
    logits = model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert logits.requires_grad and cache.length == 3


def test_positions_past_context_raise_clear_error():
    config = CONFIGS[2]
    model = GPT(config)
    with pytest.raises(GptlabError, match="context length"):
        model(torch.zeros(1, config.context_length + 1, dtype=torch.long))
    cache = KVCache(config, batch_size=1)
    model(torch.zeros(1, config.context_length, dtype=torch.long), cache=cache)
    with pytest.raises(GptlabError, match="context length"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_gpt2_initialisation_scales_residual_projections():
    config = GPTConfig(vocab_size=64, context_length=16, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.lm_head.weight is model.token_embedding.weight


def test_untied_head_and_no_qkv_bias_switches():
    config = GPTConfig(
        vocab_size=64, context_length=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False, qkv_bias=False
    )
    model = GPT(config)
    assert model.lm_head.weight is not model.token_embedding.weight
    assert model.blocks[0].attn.qkv.bias is None


def test_no_stored_attention_mask_buffer():
    model = GPT(get_preset("tiny"))
    assert all(buf.numel() <= model.config.context_length for buf in model.buffers())


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=100, n_head=3), "divisible"),
        (dict(n_layer=0), "positive"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_invalid_config_raises_clear_error(fields, message):
    with pytest.raises(GptlabError, match=message):
        GPTConfig(**fields)


def test_dropout_is_active_only_in_training():
    config = GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5)
    model = GPT(config)
    idx = torch.randint(0, 64, (2, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("T", [1, 5, 64])
def test_attention_by_products_equals_sdpa_with_gradients(T):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3))
    out_grad = torch.randn(2, 3, T, 8)
    got = _attention_by_products(q, k, v, 0.0)
    got_grads = torch.autograd.grad(got, (q, k, v), out_grad)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), out_grad)
    assert (got - expected).abs().max().item() < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(got_grads, expected_grads, strict=True)) < 1e-5


def test_attention_takes_products_only_where_they_pay(monkeypatch):
    def pays(T, S=None, dtype=torch.float32, device="cpu", B=2, H=3):
        return _products_pay(
            torch.empty(B, H, T, 4, dtype=dtype, device=device), torch.empty(B, H, S or T, 4, device=device)
        )

    assert pays(128) and not pays(129)
    assert pays(512, dtype=torch.bfloat16) and not pays(513, dtype=torch.bfloat16)
    assert not pays(8, dtype=torch.float16)
    assert not pays(8, S=12)  # after a cache: the offset mask needs SDPA
    assert not pays(8, device="meta")  # not a CPU: flash kernels win there
    monkeypatch.setattr(model_module, "PRODUCTS_MAX_SCORES", 2 * 3 * 8 * 8)
    assert pays(8) and not pays(8, B=3)


def test_attention_dropout_on_the_products_path_drops_weights_without_bias():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 2) for _ in range(3))
    plain = _attention_by_products(q, k, v, 0.0)
    draws = torch.stack([_attention_by_products(q, k, v, 0.5) for _ in range(4000)])
    assert not torch.equal(draws[0], plain)
    assert (draws.mean(0) - plain).abs().max().item() < 0.1  # inverted dropout: the same expectation


@pytest.mark.parametrize("autocast", [False, True])
def test_training_loss_and_gradients_are_the_same_through_products_and_sdpa(monkeypatch, autocast):
    config = GPTConfig(vocab_size=64, context_length=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config).train()
    idx, targets = torch.randint(0, 64, (2, 2, 32)).unbind(0)

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(idx, targets)
        return loss.item(), torch.autograd.grad(loss, list(model.parameters()))

    called = []
    monkeypatch.setattr(
        model_module, "_attention_by_products", lambda *a: called.append(1) or _attention_by_products(*a)
    )
    loss, grads = loss_and_grads()
    assert len(called) == config.n_layer
    monkeypatch.setattr(model_module, "PRODUCTS_MAX_CONTEXT", {})
    flash_loss, flash_grads = loss_and_grads()
    assert len(called) == config.n_layer
    tolerance = 2e-2 if autocast else 1e-5  # bf16 scores against flash's fp32 ones
    assert abs(loss - flash_loss) <= tolerance * abs(flash_loss)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, flash_grads, strict=True)) < (
        0.05 if autocast else 1e-4
    )


@pytest.mark.parametrize("kernel", ["torch", "onednn"])
@pytest.mark.parametrize("chunk_elements", [64, 1 << 24])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(monkeypatch, request, chunk_elements, kernel):
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    if kernel == "onednn":  # the logits are each chunk's fresh result, in chunks of at most 4 rows here
        calls = request.getfixturevalue("onednn")
        monkeypatch.setattr(model_module, "ONEDNN_LOGITS_ELEMENTS", 11 * 4)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    targets[::5] = -100
    loss = model_module.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(h2 @ w2.t(), targets, ignore_index=-100)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-6)
    assert torch.allclose(weight.grad, w2.grad, atol=1e-6)
    if kernel == "onednn":
        # the 29 targeted rows' logits and d-hidden in chunks of 4, or the logits of plain cross-entropy
        assert len(calls) == (2 * 8 if chunk_elements == 64 else 1)


def test_a_tied_heads_gradient_takes_the_embeddings_rows_in_place(monkeypatch):
    """With a tied head, the token embedding's backward adds its rows into the chunked loss's (V, C)
    gradient: every gradient equals plain autograd's, for one loss, two summed (two forwards, one
    backward), and a backward that reaches the embedding but not the loss (it then makes its own)."""
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 50 * 8)  # chunks of 8 rows: the chunked loss
    torch.manual_seed(0)
    model = GPT(CONFIGS[2]).train()
    idx, targets = torch.randint(0, 50, (3, 2, 9)), torch.randint(0, 50, (3, 2, 9))
    targets[0, 0, :3] = -100

    def gradients(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    def reference(i):  # the full logits through autograd, the embedding by F.embedding
        logits = model(idx[i])
        return F.cross_entropy(logits.flatten(0, 1), targets[i].flatten(), ignore_index=-100)

    linked, calls = model._links_tied_gradient, []
    monkeypatch.setattr(model, "_links_tied_gradient", lambda *args: calls.append(linked(*args)) or calls[-1])
    for ours, plain in (
        (lambda: model(idx[0], targets[0]), lambda: reference(0)),
        (
            lambda: model(idx[1], targets[1]) + 0.5 * model(idx[2], targets[2]),
            lambda: reference(1) + 0.5 * reference(2),
        ),
    ):
        got, expected = gradients(ours()), gradients(plain())
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert sum(calls) == 3  # the link was used by each forward with targets
    inner = {}
    model.blocks[0].register_forward_hook(lambda module, args, out: inner.update(out=out))
    model(idx[0], targets[0])  # the loss's backward never runs
    got = gradients(inner["out"].square().sum())["token_embedding.weight"]
    model(idx[0])
    assert torch.equal(got, gradients(inner["out"].square().sum())["token_embedding.weight"]) and got.any()
    # A pass that runs the loss's backward but asks only for another gradient passes a head gradient
    # that must not reach a later pass through the embedding.
    loss = model(idx[0], targets[0])
    torch.autograd.grad(loss, [model.ln_f.weight], retain_graph=True)
    assert torch.equal(gradients(inner["out"].square().sum())["token_embedding.weight"], got)
    # Second-order gradients (the kept gradient buffer is written in place under create_graph=True)
    first = torch.autograd.grad(model(idx[0], targets[0]), model.lm_head.weight, create_graph=True)[0]
    torch.testing.assert_close(first, gradients(reference(0))["token_embedding.weight"], rtol=1e-5, atol=1e-6)


def test_torch_func_transforms_take_the_training_loss_of_a_tied_model():
    """`torch.func.grad` of the mean loss (logits in one chunk: the plain cross-entropy) gives autograd's
    gradients: the tied embedding's link stays out of functorch's way."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = GPT(CONFIGS[2]).train()
    idx, targets = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    params = dict(model.named_parameters())
    got = grad(lambda p: functional_call(model, p, (idx,), {"targets": targets}))(params)
    model(idx, targets).backward()
    for name, param in params.items():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7)


def test_the_head_gradient_reuses_its_buffer_only_when_nothing_holds_it(monkeypatch):
    """The chunked loss writes the head's gradient into a kept buffer when the last one was let go, and
    into a new one while a gradient still holds it: accumulation and zero-filled gradients stay right."""
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 50 * 8)
    torch.manual_seed(0)
    model = GPT(CONFIGS[2]).train()
    weight = model.lm_head.weight
    batches = [(torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))) for _ in range(2)]

    def expected(*which):  # plain autograd over the full logits
        model.zero_grad(set_to_none=True)
        for i in which:
            F.cross_entropy(model(batches[i][0]).flatten(0, 1), batches[i][1].flatten()).backward()
        return weight.grad.clone()

    first, both = expected(0), expected(0, 1)
    model.zero_grad(set_to_none=True)
    pointers = []
    for _ in range(2):
        model(*batches[0]).backward()
        torch.testing.assert_close(weight.grad, first)
        pointers.append(weight.grad.data_ptr())
        model.zero_grad(set_to_none=True)
    assert pointers[0] == pointers[1]  # the buffer came back
    model(*batches[0]).backward()
    model(*batches[1]).backward()  # accumulated: the first gradient holds the buffer
    torch.testing.assert_close(weight.grad, both)
    model.zero_grad(set_to_none=False)
    model(*batches[0]).backward()
    torch.testing.assert_close(weight.grad, first)


def test_a_loss_under_inference_mode_does_not_break_the_next_training_step(monkeypatch):
    """The chunked loss keeps its buffers; ones made under inference mode may not be written outside it."""
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 11 * 4)
    model_module.release_loss_buffers()
    hidden, weight = torch.randn(37, 16), torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated = model_module.linear_cross_entropy(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model_module.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert torch.equal(loss.detach(), evaluated) and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stored_elements", [11 * 8, 1 << 27])  # a weight-gradient product every 2 chunks; one
@pytest.mark.parametrize("block_rows", [4, 1024])  # the (C, V) bf16 head copied in blocks of 4, 4 and 3 rows; one
def test_chunked_loss_under_bf16_autocast_equals_autocast_cross_entropy(monkeypatch, stored_elements, block_rows):
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 11 * 4)  # chunks of 4 rows
    monkeypatch.setattr(model_module, "TRANSPOSE_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(model_module, "LOSS_STORED_GRAD_ELEMENTS", stored_elements)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    targets[::5] = -100
    with torch.no_grad():  # row 1 predicts its target with p = 0.9988: p - 1 must not round to 0 or 0.004
        hidden[1] = 0.0
        hidden[1, 0] = 10.0
        weight[:, 0] = 0.0
        weight[targets[1], 0] = 0.9
        # row 2's target has p = e^-400, 0 in fp32: its log-probability must still be exact, not -inf
        hidden[2] = 0.0
        hidden[2, 1] = 200.0
        weight[:, 1] = 0.0
        weight[(targets[2] + 1) % 11, 1], weight[targets[2], 1] = 1.0, -1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model_module.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    # Against fp32 the bf16 rounding shows; it must be no larger than autocast's own plain cross-entropy's
    ours = (hidden.grad, weight.grad)
    exact = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ weight.t(), targets), (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.t()  # bf16
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
    plain = torch.autograd.grad(expected, (hidden, weight))
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for mine, reference, truth in zip(ours, plain, exact, strict=True):
        error, reference_error = (mine - truth).norm() / truth.norm(), (reference - truth).norm() / truth.norm()
        assert error < max(2 * reference_error, 1e-3) and error < 0.01, (error, reference_error)
    sure_row_error = (hidden.grad[1] - exact[0][1]).norm() / exact[0][1].norm()
    assert sure_row_error < 0.05 and not hidden.grad[0].any(), sure_row_error  # row 0's target is ignored


def test_chunked_loss_scales_its_gradients_and_refuses_a_second_backward(monkeypatch):
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 11 * 4)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    (model_module.linear_cross_entropy(hidden, weight, targets) * 0.25).backward()  # as gradient accumulation
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (torch.nn.functional.cross_entropy(h2 @ w2.t(), targets) * 0.25).backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    loss = model_module.linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(GptlabError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_in_place_equals_the_out_of_place_result(dtype):
    import gptlab.model as model_module

    rows = (torch.randn(7, 50_257) * 4).to(dtype)
    for function in (torch.softmax, torch.log_softmax):
        expected, written = function(rows, dim=-1), rows.clone()
        model_module._normalize_in_place(function, written)
        assert torch.equal(written, expected), function


def test_the_loss_takes_only_rows_with_a_target_to_the_head():
    import gptlab.model as model_module

    hidden, targets = torch.arange(12.0).view(6, 2), torch.tensor([-100, 3, -100, 4, 5, -100])
    kept_hidden, kept_targets = model_module.targeted_rows(hidden, targets)
    assert kept_hidden.tolist() == [[2.0, 3.0], [6.0, 7.0], [8.0, 9.0]] and kept_targets.tolist() == [3, 4, 5]
    every = torch.tensor([1, 2, 3, 4, 5, 6])
    assert model_module.targeted_rows(hidden, every)[0] is hidden  # pretraining: nothing to select


def test_a_batch_without_targets_has_zero_loss_and_zero_gradients():
    import gptlab.model as model_module

    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = model_module.linear_cross_entropy(hidden, weight, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("chunk_elements", [11 * 4, 1 << 24])  # 4 rows a chunk (recomputed in backward), one chunk
def test_token_losses_and_gradients_equal_unreduced_cross_entropy(monkeypatch, chunk_elements):
    import gptlab.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    targets[::3] = -100
    scale = torch.randn(37)  # weigh rows apart, as DPO weighs sequences
    losses = model_module.token_losses(hidden, weight, targets)
    (losses * scale).sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(h2 @ w2.t(), targets, ignore_index=-100, reduction="none")
    (expected * scale).sum().backward()
    assert torch.allclose(losses, expected, atol=1e-6) and bool((losses[::3] == 0).all())
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-5)
    assert torch.allclose(weight.grad, w2.grad, atol=1e-5)


def test_forward_with_reduction_none_gives_each_positions_loss():
    model = GPT(CONFIGS[0])
    idx = torch.randint(0, CONFIGS[0].vocab_size, (2, 10))
    targets = torch.randint(0, CONFIGS[0].vocab_size, (2, 10))
    targets[1, :4] = -100
    per_position = model(idx, targets, reduction="none")
    assert per_position.shape == (2, 10) and bool((per_position[1, :4] == 0).all())
    assert torch.allclose(per_position.sum() / 16, model(idx, targets), atol=1e-6)


def test_forward_with_targets_equals_cross_entropy_of_logits():
    config = CONFIGS[0]
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 10))
    targets = torch.randint(0, config.vocab_size, (2, 10))
    expected = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert torch.allclose(model(idx, targets), expected, atol=1e-6)
    assert model(idx, last_only=True).shape == (2, 1, config.vocab_size)


def test_cache_joins_into_allocated_rows_and_moves_only_what_it_must():
    """Rows that join fill rows allocated beforehand (the keys' storage stays), growth doubles up to
    max_rows, and rows kept in any order hold what they held: each row's real keys, checked against a
    cache of that row's prompt alone."""
    config = CONFIGS[0]
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompts = [torch.randint(0, config.vocab_size, (1, n)) for n in (5, 3, 7, 2, 4)]

    def prefilled(prompt, length=None):
        cache = KVCache(config, 1, length or prompt.shape[1])
        model.hidden_states(prompt, None, None, cache)
        return cache

    def real_keys(cache, row):  # (L, H, n, D): the row's unmasked slots
        return cache.keys[:, row, :, : cache.length][:, :, cache.key_mask[row, : cache.length]]

    def check(cache, held):
        for row, prompt in enumerate(held):
            assert torch.equal(real_keys(cache, row), alone[prompt]), (row, prompt)
            assert int(cache.next_position[row]) == prompts[prompt].shape[1]
        assert int(cache.key_mask[:, : cache.length].sum()) == sum(prompts[p].shape[1] for p in held)

    with torch.inference_mode():
        alone = [prefilled(p).keys[:, 0] for p in prompts]
        cache = prefilled(prompts[0], 16)
        cache.max_rows = 3
        for i in (1, 2):  # 1 -> 2 rows, then 4 would be the double: bounded by max_rows
            cache.join(prefilled(prompts[i]))
        assert cache.capacity == 3 and cache.length == 7
        check(cache, [0, 1, 2])
        storage = cache.keys.untyped_storage().data_ptr()
        cache.keep_rows(torch.tensor([0, 2]))  # the middle row leaves: the last moves down
        check(cache, [0, 2])
        cache.join(prefilled(prompts[3]))  # shorter: into the free row, nothing else moves
        assert cache.keys.untyped_storage().data_ptr() == storage and cache.batch_size == 3
        check(cache, [0, 2, 3])
        cache.keep_rows(torch.tensor([2, 0]))  # any order
        check(cache, [3, 0])
        cache.join(prefilled(prompts[4]))
        assert cache.keys.untyped_storage().data_ptr() == storage and cache.has_padding
        check(cache, [3, 0, 4])
        cache.keep_rows(torch.tensor([2, 2, 0, 1, 2]))  # rows repeated, more than are allocated
        check(cache, [4, 4, 3, 0, 4])
        cache.keep_rows(torch.tensor([], dtype=torch.long))
        cache.compact()  # no rows: nothing to drop
        cache.reset()
        cache.compact()  # no positions
        assert cache.batch_size == 0 and cache.length == 0
