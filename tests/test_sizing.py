import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import write_run_config
from gptlab.cli import main, resolve_model_config
from gptlab.config import PRESETS, get_preset, load_config_file
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


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("demo.yaml", get_preset("demo")),
        ("gpt2-124m-gpu.yaml", get_preset("gpt2")),
        ("shakespeare-char.yaml", get_preset("char-small", vocab_size=257)),  # the byte tokenizer's vocabulary
        ("shakespeare-gpt2.yaml", get_preset("bpe-mini", dropout=0.1)),
    ],
)
def test_size_of_a_pretraining_recipe_is_the_model_it_trains(recipe, expected):
    assert resolve_model_config(str(RECIPES / recipe)) == expected


@pytest.mark.parametrize("recipe", ["instruct-gpt2-medium.yaml", "preference-gpt2-medium.yaml"])
def test_size_of_a_finetuning_recipe_is_the_model_of_its_init_from_run(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipes name their runs relative to the working directory
    assert main(["size", str(RECIPES / recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "starts from the run runs/" in err
    base = str(load_config_file(RECIPES / recipe)["init_from"])
    write_run_config(Path(base), {"task": "pretrain", "model": asdict(get_preset("gpt2-medium", dropout=0.1))})
    assert resolve_model_config(str(RECIPES / recipe)) == get_preset("gpt2-medium", dropout=0.1)
    assert main(["size", str(RECIPES / recipe)]) == 0
    assert "24 layers, 16 heads, width 1024" in capsys.readouterr().out


def test_size_of_a_run_directory_and_a_model_config(tmp_path):
    write_run_config(tmp_path / "run", {"task": "pretrain", "model": asdict(get_preset("tiny"))})
    assert resolve_model_config(str(tmp_path / "run")) == get_preset("tiny")
    (tmp_path / "model.yaml").write_text("preset: tiny\nn_layer: 3\n")
    assert resolve_model_config(str(tmp_path / "model.yaml")) == get_preset("tiny", n_layer=3)


def test_size_of_a_recipe_starting_from_a_run_is_the_model_that_run_would_train(tmp_path, capsys):
    write_run_config(tmp_path / "base", {"task": "pretrain", "model": asdict(get_preset("tiny"))})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task: pretrain\ninit_from: {tmp_path / 'base'}\nmodel:\n  dropout: 0.1\n")
    assert resolve_model_config(str(recipe)) == get_preset("tiny", dropout=0.1)  # continued pretraining
    recipe.write_text(f"task: instruct\ninit_from: {tmp_path / 'base'}\nmodel:\n  dropout: 0.2\n")
    assert resolve_model_config(str(recipe)) == get_preset("tiny", dropout=0.2)
    recipe.write_text(f"task: instruct\ninit_from: {tmp_path / 'base'}\nmodel:\n  n_layer: 7\n")
    assert main(["size", str(recipe)]) == 2
    assert "model.n_layer is 7 but 2 in the base run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "holds no config"),
        ("task: instruct\n", "names no run to start from (init_from)"),
        ("n_layer: 3.5\n", "invalid value 3.5 for model.n_layer in"),
        ("task: pretrain\nmodel: [1]\n", "config section 'model' in"),
        ("n_layer: 3\nbogus: 1\n", "unknown config field model.bogus in"),
    ],
)
def test_size_of_a_config_file_without_a_model_is_a_one_line_error(text, message, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(text)
    assert main(["size", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_training_steps_flops_count_only_the_logits_and_gradients_computed():
    from gptlab.sizing import Trainable, block_matrix_params

    config, T = get_preset("tiny"), 32
    blocks, head = block_matrix_params(config), config.vocab_size * config.n_embd
    attention = 4 * config.n_layer * T * config.n_embd
    assert train_flops_per_token(config, T) == 6 * (blocks + head) + 3 * attention
    # LoRA: no weight gradient of a frozen matrix; a quarter of the positions have a target.
    lora = Trainable(blocks=0.0, reach=1.0, head=False)
    assert train_flops_per_token(config, T, 0.25, lora) == round(4 * (blocks + 0.25 * head) + 3 * attention)
    # Only a classifier's small head trains: the forward pass alone.
    assert train_flops_per_token(config, T, 0.0, Trainable(0.0, 0.0, False)) == 2 * blocks + attention


def test_trainable_parts_reads_what_requires_a_gradient():
    from gptlab.classify import GPTClassifier, set_trainable
    from gptlab.config import ClassifyConfig, LoRAConfig
    from gptlab.lora import apply_lora
    from gptlab.sizing import Trainable, trainable_parts

    model = GPT(get_preset("tiny"))  # 2 blocks, the head tied to the token embedding
    assert trainable_parts(model) == Trainable(1.0, 1.0, True)
    apply_lora(model, LoRAConfig())
    assert trainable_parts(model) == Trainable(0.0, 1.0, False)  # adapters in every block: backward reaches all
    classifier = GPTClassifier(get_preset("tiny"), 2, ClassifyConfig().pooling)
    set_trainable(classifier, ClassifyConfig(trainable="last_blocks", last_blocks=1))
    assert trainable_parts(classifier) == Trainable(0.5, 0.5, True)


def expected_trainable(config, task, section, lora):
    """What trains, counted apart from the code that freezes: a classifier's head (and its last block and
    final norm, or LoRA's adapters); an instruction run's adapters."""
    from gptlab.config import LoRAConfig
    from gptlab.lora import expected_lora_parameters

    C, labels = config.n_embd, len(section.get("labels", []))
    adapters = expected_lora_parameters(config, LoRAConfig(**lora)) if lora else 0
    if task != "classify":
        return adapters
    block = 12 * C * C + 13 * C  # its four matrices with their biases (qkv_bias), and two LayerNorms
    return labels * C + adapters + (block + 2 * C if section.get("trainable", "last_blocks") == "last_blocks" else 0)


@pytest.mark.parametrize(
    "extra",
    [
        {"task": "classify", "classify": {"labels": ["ham", "spam"], "trainable": "last_blocks"}},
        {
            "task": "classify",
            "classify": {"labels": ["a", "b", "c"], "trainable": "lora"},
            "lora": {"rank": 4, "targets": ["attn.qkv"]},
        },  # fmt: skip
        {"task": "instruct", "lora": {"rank": 2}},
    ],
)
def test_size_of_a_classifier_or_lora_run_counts_its_head_adapters_and_what_trains(extra, tmp_path, capsys):
    config = get_preset("tiny")
    write_run_config(tmp_path / "run", {"model": asdict(config), **extra})
    assert main(["size", str(tmp_path / "run"), "--json"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    section, lora = extra.get(extra["task"], {}), extra.get("lora")
    trainable, labels = expected_trainable(config, extra["task"], section, lora), len(section.get("labels", []))
    gpt = count_parameters(config)
    head = labels * config.n_embd if labels else gpt.lm_head
    adapters = trainable - head if lora and labels else trainable if lora else 0
    assert report["parameters"]["total"] == gpt.total - gpt.lm_head + head + adapters
    assert report["trainable_parameters"] == trainable and report["run"]["labels"] == labels
    assert report["parameters"]["adapters"] == adapters
    if labels:  # no vocabulary head: its own small one, and no logits in the FLOPs
        assert report["parameters"]["lm_head"] == head
        assert report["train_flops_per_token"] < train_flops_per_token(config)
    fp32 = report["memory"]["fp32"]
    assert fp32["gradients"] == 4 * trainable and fp32["adamw_states"] == 8 * trainable
    assert main(["size", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "parameters, trainable" in table and ("classifier head" in table) == bool(labels)
    assert ("LoRA adapters" in table) == bool(lora) and "Muon" not in table


def test_size_of_a_finetuning_recipe_counts_what_its_run_would_train(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(shared_data))
    config = get_preset("tiny")
    write_run_config(tmp_path / "base", {"task": "pretrain", "model": asdict(config)})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"task: instruct\ninit_from: {tmp_path / 'base'}\ninstruct:\n  trainable: lora\nlora:\n  rank: 2\n"
    )
    assert main(["size", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_parameters"] == expected_trainable(
        config, "instruct", {}, {"rank": 2}
    )
    # A classifier recipe naming no labels: the data's (ham and spam), its last block by default.
    recipe.write_text(f"task: classify\ninit_from: {tmp_path / 'base'}\nclassify:\n  source: sms-spam\n")
    assert main(["size", str(recipe), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"]["labels"] == 2
    assert report["trainable_parameters"] == expected_trainable(config, "classify", {"labels": [0, 1]}, None)
