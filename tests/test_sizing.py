import re

import pytest
import torch

from gptlab.cli import main
from gptlab.config import PRESETS, get_preset
from gptlab.model import GPT
from gptlab.sizing import count_parameters, muon_state_bytes, train_flops_per_token, training_memory_bytes

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "tiny", "bpe-mini"])
def test_parameter_count_equals_transformers_num_parameters(preset):
    config = get_preset(preset)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
    )  # fmt: skip
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        hf = transformers.GPT2LMHeadModel(hf_config)
    assert count_parameters(config).total == hf.num_parameters()


@pytest.mark.parametrize("fields", [dict(), dict(tie_embeddings=False), dict(qkv_bias=False, bias=False)])
def test_analytic_count_equals_built_model(fields):
    config = get_preset("tiny", **fields)
    assert count_parameters(config).total == GPT(config).num_parameters()


def test_published_sizes():
    assert count_parameters(get_preset("gpt2")).total == 124_439_808
    assert count_parameters(get_preset("gpt2-xl")).total == 1_557_611_200  # transformers: 1,557,611,200
    assert count_parameters(get_preset("gpt3-175b")).total == pytest.approx(175e9, rel=0.01)
    assert count_parameters(get_preset("gpt3-13b")).total == pytest.approx(13e9, rel=0.03)


def test_training_flops_close_to_six_n():
    config = get_preset("gpt3-175b")
    n = count_parameters(config).non_embedding
    assert train_flops_per_token(config) == pytest.approx(6 * n, rel=0.05)


def test_size_cli_prints_table(capsys):
    assert main(["size", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "KV cache" in out and "device-hours" in out
    assert re.search(r"peak learning rate \(GPT-3 paper\) +0\.0006, the default for this size", out)
    assert main(["size", "char-small"]) == 0
    assert "peak learning rate" not in capsys.readouterr().out  # no published rate for this size


def test_size_cli_unknown_preset_fails_with_one_line(capsys):
    assert main(["size", "gpt-five"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model preset") and "\n" not in err


def test_every_preset_is_valid():
    for name in PRESETS:
        get_preset(name)


@pytest.mark.parametrize("fields", [dict(), dict(tie_embeddings=False), dict(qkv_bias=False, bias=False)])
def test_optimizer_state_sizes_equal_what_the_optimizers_hold(fields):
    from gptlab.config import TrainConfig
    from gptlab.train import build_optimizer

    config = get_preset("tiny", **fields)
    n_params = count_parameters(config).total
    for name, expected in (("adamw", training_memory_bytes(n_params)["fp32"]["adamw_states"]),
                           ("muon", muon_state_bytes(config, n_params)["fp32"])):  # fmt: skip
        model = GPT(config)
        optimizer = build_optimizer(model, TrainConfig(optimizer=name), torch.device("cpu"))
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
        optimizer.step()
        held = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if t.dim())
        assert held == expected, name
