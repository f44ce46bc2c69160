import pytest
import torch

from gptlab.checkpoint import WEIGHTS_FILE, load_run, save_checkpoint, write_run_config
from gptlab.config import GPTConfig, LoRAConfig, config_to_dict, get_preset
from gptlab.errors import GptlabError
from gptlab.lora import (
    LoRALinear,
    apply_lora,
    count_trainable,
    expected_lora_parameters,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from gptlab.model import GPT
from gptlab.tokenizer import ByteTokenizer

CONFIG = GPTConfig(vocab_size=257, context_length=32, n_layer=2, n_head=2, n_embd=32)
ALL_LAYERS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"]


def randomise_adapters(model):
    """Non-zero B so the adapters change the output (B starts at zero)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.1)


def tokens(batch=2, length=16):
    return torch.randint(0, CONFIG.vocab_size, (batch, length))


def test_zero_initialised_adapters_leave_the_output_bit_identical():
    base = GPT(CONFIG).eval()
    idx = tokens()
    expected = base(idx)
    model = apply_lora(base, LoRAConfig(rank=4, targets=ALL_LAYERS))
    assert torch.equal(model(idx), expected)


def test_adapters_change_the_output_once_b_is_nonzero():
    model = apply_lora(GPT(CONFIG).eval(), LoRAConfig(rank=4))
    idx = tokens()
    before = model(idx)
    randomise_adapters(model)
    assert not torch.allclose(model(idx), before)


@pytest.mark.parametrize("targets", [["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], ALL_LAYERS])
def test_merged_logits_equal_the_adapter_model(targets):
    model = apply_lora(GPT(CONFIG).eval(), LoRAConfig(rank=4, alpha=8.0, targets=targets))
    randomise_adapters(model)
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)
        merged = merge_lora(model)(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_merging_an_adapted_tied_head_unties_it_and_keeps_the_embedding():
    model = apply_lora(GPT(CONFIG).eval(), LoRAConfig(rank=4, targets=["lm_head"]))
    embedding = model.token_embedding.weight.detach().clone()
    assert model.lm_head.weight is model.token_embedding.weight
    randomise_adapters(model)
    merge_lora(model)
    assert model.config.tie_embeddings is False
    assert torch.equal(model.token_embedding.weight, embedding)
    assert not torch.equal(model.lm_head.weight, embedding)


@pytest.mark.parametrize(
    "targets", [["attn.qkv"], ["mlp.fc", "mlp.proj"], ["proj"], ["blocks.0.attn.qkv", "lm_head"], ALL_LAYERS]
)
@pytest.mark.parametrize("rank", [1, 8])
def test_trainable_count_is_what_the_rank_predicts(targets, rank):
    model = GPT(CONFIG)
    total_before = model.num_parameters()
    lora = LoRAConfig(rank=rank, targets=targets)
    apply_lora(model, lora)
    trainable, total = count_trainable(model)
    assert trainable == expected_lora_parameters(CONFIG, lora)
    assert total == total_before + trainable


def test_gpt2_rank_8_trains_under_5_percent_of_the_parameters():
    config = get_preset("gpt2")
    with torch.device("meta"):
        model = apply_lora(GPT(config), LoRAConfig(rank=8))
    trainable, total = count_trainable(model)
    assert trainable == expected_lora_parameters(config, LoRAConfig(rank=8)) == 12 * 16 * 768 * 8
    assert trainable / total < 0.05


def test_only_adapters_require_grad():
    model = apply_lora(GPT(CONFIG), LoRAConfig(rank=2, targets=ALL_LAYERS))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert len(trainable) == 2 * (4 * CONFIG.n_layer + 1)


def test_saved_adapters_include_unfrozen_parameters_also_under_activation_checkpointing():
    from gptlab.distributed import checkpoint_blocks

    model = apply_lora(GPT(CONFIG), LoRAConfig(rank=2, targets=["attn.qkv"]))
    model.blocks[0].ln_1.weight.requires_grad_(True)
    plain = set(lora_state_dict(model))
    assert "blocks.0.ln_1.weight" in plain
    assert set(lora_state_dict(checkpoint_blocks(model))) == plain


def test_training_moves_only_the_adapters():
    model = apply_lora(GPT(CONFIG), LoRAConfig(rank=4, targets=ALL_LAYERS))
    frozen = {name: t.clone() for name, t in model.state_dict().items() if not name.endswith(("lora_A", "lora_B"))}
    adapters = {name: t.clone() for name, t in lora_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = tokens()
    for _ in range(3):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(model.state_dict()[name], t) for name, t in frozen.items())
    assert all(not torch.equal(lora_state_dict(model)[name], t) for name, t in adapters.items())


def test_the_models_loss_and_its_gradients_include_an_adapted_head():
    model = apply_lora(GPT(CONFIG), LoRAConfig(rank=4, targets=["lm_head"]))
    randomise_adapters(model)
    idx = tokens()
    gradients = []
    for loss_of in (
        lambda: model(idx[:, :-1], targets=idx[:, 1:]),
        lambda: torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()),
    ):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        gradients.append((loss.detach(), model.lm_head.lora_A.grad.clone(), model.lm_head.lora_B.grad.clone()))
    for fused, reference in zip(*gradients, strict=True):
        assert torch.allclose(fused, reference, atol=1e-6)
    assert gradients[0][1].abs().sum() > 0


def test_target_matching_no_layer_is_a_one_line_error():
    with pytest.raises(GptlabError, match=r"'attn.qvk' matches no linear layer \(did you mean 'attn.qkv'\?\)") as err:
        apply_lora(GPT(CONFIG), LoRAConfig(targets=["attn.qkv", "attn.qvk"]))
    assert "\n" not in str(err.value)
    with pytest.raises(GptlabError, match="'ln_1' matches no linear layer"):
        apply_lora(GPT(CONFIG), LoRAConfig(targets=["ln_1"]))


def test_invalid_lora_configs_are_refused():
    for bad in (dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(targets=[])):
        with pytest.raises(GptlabError, match="lora\\."):
            LoRAConfig(**bad)


def test_lora_twice_is_refused():
    model = apply_lora(GPT(CONFIG), LoRAConfig())
    with pytest.raises(GptlabError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


def test_adapter_state_round_trips_into_a_fresh_model():
    lora = LoRAConfig(rank=4, targets=ALL_LAYERS)
    model = apply_lora(GPT(CONFIG).eval(), lora)
    randomise_adapters(model)
    state = lora_state_dict(model)
    assert all(name.endswith((".lora_A", ".lora_B")) for name in state)
    fresh = apply_lora(GPT(CONFIG).eval(), lora)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in state}, strict=False)
    load_lora_state_dict(fresh, state)
    idx = tokens()
    assert torch.equal(fresh(idx), model(idx))


def test_adapters_of_another_rank_or_targets_are_refused():
    model = apply_lora(GPT(CONFIG), LoRAConfig(rank=4))
    with pytest.raises(GptlabError, match="another LoRA rank"):
        load_lora_state_dict(apply_lora(GPT(CONFIG), LoRAConfig(rank=2)), lora_state_dict(model))
    with pytest.raises(GptlabError, match="which the model lacks"):
        load_lora_state_dict(apply_lora(GPT(CONFIG), LoRAConfig(targets=["mlp.fc"])), lora_state_dict(model))
    with pytest.raises(GptlabError, match="lacks 'blocks.0.attn.qkv.lora_A'"):
        load_lora_state_dict(model, {})


def test_an_unfrozen_task_parameter_is_saved_with_the_adapters():
    model = apply_lora(GPT(CONFIG), LoRAConfig(rank=2, targets=["attn.qkv"]))
    model.ln_f.requires_grad_(True)
    assert {"ln_f.weight", "ln_f.bias"} <= set(lora_state_dict(model))


# ---------------------------------------------------------------- runs on disk


def make_run(run_dir, model, extra_config=None, weights=None):
    write_run_config(run_dir, {"task": "pretrain", "model": config_to_dict(CONFIG), **(extra_config or {})})
    ByteTokenizer().save(run_dir / "tokenizer")
    return save_checkpoint(run_dir, 10, weights if weights is not None else model.state_dict(), {"step": 10})


def make_lora_run(tmp_path, lora=None):
    """A base run and a LoRA run on it that stores only its adapters; returns (LoRA run, its model)."""
    lora = lora or LoRAConfig(rank=4, targets=ALL_LAYERS)
    model = GPT(CONFIG).eval()
    base = make_run(tmp_path / "base", model)
    apply_lora(model, lora)
    randomise_adapters(model)
    lora_run = tmp_path / "lora"
    extra = {"init_from": str(base), "lora": config_to_dict(lora)}
    make_run(lora_run, model, extra, weights=lora_state_dict(model))
    return lora_run, model


def test_load_run_rebuilds_base_plus_adapters(tmp_path):
    lora_run, model = make_lora_run(tmp_path)
    loaded = load_run(lora_run)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded.model(idx), model(idx))
    assert loaded.model.lm_head.weight is loaded.model.token_embedding.weight


def test_lora_run_checkpoints_are_small(tmp_path):
    lora_run, _ = make_lora_run(tmp_path, LoRAConfig(rank=2))
    adapter_file = next((lora_run / "checkpoints").iterdir()) / WEIGHTS_FILE
    base_file = next((tmp_path / "base" / "checkpoints").iterdir()) / WEIGHTS_FILE
    assert adapter_file.stat().st_size < base_file.stat().st_size / 10


def test_lora_run_without_its_base_is_a_clear_error(tmp_path):
    lora_run, _ = make_lora_run(tmp_path)
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(GptlabError, match="needs its base run .* which does not exist"):
        load_run(lora_run)


def test_lora_run_on_a_lora_base_is_refused(tmp_path):
    lora_run, model = make_lora_run(tmp_path)
    chained = tmp_path / "chained"
    extra = {"init_from": str(lora_run), "lora": config_to_dict(LoRAConfig())}
    make_run(chained, model, extra, weights=lora_state_dict(model))
    with pytest.raises(GptlabError, match="itself a LoRA run; merge it first"):
        load_run(chained)


def test_adapters_start_the_same_in_every_process_for_one_seed():
    """The adapters' random start must not hang on string hashing, which differs from process to process."""
    import hashlib
    import os
    import subprocess
    import sys

    code = (
        "import torch, hashlib; from gptlab.config import GPTConfig, LoRAConfig; from gptlab.model import GPT; "
        "from gptlab.lora import apply_lora, lora_state_dict; torch.manual_seed(0); "
        "m = GPT(GPTConfig(vocab_size=64, context_length=8, n_layer=2, n_head=2, n_embd=16)); "
        "apply_lora(m, LoRAConfig(rank=2, targets=['attn.qkv', 'attn.proj', 'mlp.fc', 'mlp.proj', 'lm_head'])); "
        "s = lora_state_dict(m); print(hashlib.sha256(b''.join(s[k].numpy().tobytes() for k in sorted(s))).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1 and len(next(iter(digests)).strip()) == len(hashlib.sha256().hexdigest())
