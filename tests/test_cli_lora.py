import torch

from gptlab.checkpoint import load_run, read_run_config
from gptlab.cli import main
from gptlab.config import LoRAConfig
from test_lora import ALL_LAYERS, make_lora_run, make_run, tokens


def test_lora_merge_writes_a_plain_run_with_the_same_logits(tmp_path, capsys):
    lora_run, model = make_lora_run(tmp_path, LoRAConfig(rank=4, targets=ALL_LAYERS))
    out = tmp_path / "merged"
    assert main(["lora", "merge", str(lora_run), str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    config = read_run_config(out)
    assert "lora" not in config
    assert config["model"]["tie_embeddings"] is False  # the adapted head was untied
    merged = load_run(out)
    assert merged.tokenizer.decode(merged.tokenizer.encode("héllo")) == "héllo"
    assert merged.checkpoint.name == "step-0000010"
    idx = tokens()
    with torch.no_grad():
        assert (merged.model(idx) - model(idx)).abs().max().item() <= 1e-5


def test_lora_merge_of_a_plain_run_is_a_one_line_error(tmp_path, capsys):
    lora_run, model = make_lora_run(tmp_path)
    assert main(["lora", "merge", str(tmp_path / "base"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a LoRA run" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_lora_merge_refuses_to_overwrite_a_run(tmp_path, capsys):
    lora_run, model = make_lora_run(tmp_path)
    taken = tmp_path / "taken"
    make_run(taken, model, weights={})
    assert main(["lora", "merge", str(lora_run), str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err
