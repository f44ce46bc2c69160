import json
import math
import re
from pathlib import Path

import pytest
import torch

import gptlab.model
from gptlab import checkpoint as ckpt
from gptlab.cli import main
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.sizing import train_flops_per_token
from gptlab.train import (
    Muon,
    Runtime,
    accumulation_steps,
    build_optimizer,
    learning_rate,
    muon_matrices,
    newton_schulz,
    newton_schulz_gram,
    orthogonalize,
    plot_metrics,
    resolve_autocast,
    resolve_device,
    set_learning_rate,
    train,
)

CONFIG = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


class RandomWindows:
    """A small objective over a fixed token stream, with its own seeded generator (resumable)."""

    def __init__(self, batch_size=4, seed=0):
        self.tokens = torch.arange(400) % 7 + (torch.arange(400) // 50) % 3
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.tokens_per_batch = batch_size * CONFIG.context_length
        self.flops_per_token = train_flops_per_token(CONFIG)

    def _batch(self, generator):
        T = CONFIG.context_length
        starts = torch.randint(0, len(self.tokens) - T - 1, (self.batch_size,), generator=generator)
        x = torch.stack([self.tokens[s : s + T] for s in starts])
        y = torch.stack([self.tokens[s + 1 : s + T + 1] for s in starts])
        return x, y

    def next_batch(self):
        x, y = self._batch(self.generator)
        return {"input": x, "target": y}

    def loss(self, model, batch):
        return model(batch["input"], batch["target"])

    def evaluate(self, model, runtime):
        x, y = self._batch(torch.Generator().manual_seed(123))
        return {"val_loss": model(x, y).item()}

    def samples(self, model, runtime):
        return []

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def train_config(**overrides):
    fields = dict(max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2, eval_interval=4,
                  log_interval=2, eval_batches=1, peak_flops=1e11, seed=0)  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


def run(tmp_path, config, resume_from=None, objective=None, model=None):
    torch.manual_seed(0)
    model = model or GPT(CONFIG)
    objective = objective or RandomWindows()
    return train(model, objective, config, tmp_path, Runtime(torch.device("cpu")), resume_from=resume_from), model


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(55, config) == pytest.approx(0.55)
    assert learning_rate(100, config) == pytest.approx(0.1)
    steps = [learning_rate(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))


def test_weight_decay_only_on_matrices():
    model = GPT(CONFIG)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, decay_embeddings=False), torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.blocks[0].attn.qkv.bias) not in decayed
    assert id(model.ln_f.weight) not in decayed
    assert id(model.token_embedding.weight) not in decayed
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert total == model.num_parameters()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(CONFIG)
    config = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02, weight_decay=0.1)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    on_muon = {id(p) for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    block = model.blocks[0]
    expected = {block.attn.qkv.weight, block.attn.proj.weight, block.mlp.fc.weight, block.mlp.proj.weight}
    assert {id(p) for p in expected} <= on_muon and len(on_muon) == 4 * CONFIG.n_layer
    for off in (model.token_embedding.weight, model.lm_head.weight, block.attn.qkv.bias, model.ln_f.weight):
        assert id(off) not in on_muon
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_parameters()
    muon_group = next(g for g in optimizer.param_groups if g["muon"])
    assert muon_group["weight_decay"] == 0.1
    assert set_learning_rate(optimizer, 10**6, config) == pytest.approx(1e-4)  # the cosine's floor, 0.1 of the peak
    # Muon's group first, at its own peak's floor; AdamW's groups at the schedule's
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3, 1e-4, 1e-4])


def test_muon_leaves_lora_adapters_to_adamw():
    from gptlab.config import LoRAConfig
    from gptlab.lora import apply_lora

    model = GPT(CONFIG)
    apply_lora(model, LoRAConfig(rank=2))
    assert muon_matrices(model) == []  # the wrapped weights are frozen and the adapters are not nn.Linear
    with pytest.raises(GptlabError, match="no weight matrices to train here.*--train.optimizer adamw"):
        build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))


def test_muon_puts_loaded_step_counts_on_the_parameters_device():
    # Checkpoints hold CPU tensors; "meta" stands in for a GPU here.
    weight, bias = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    trained = Muon([{"params": [weight], "muon": True}, {"params": [bias]}], lr=0.01)
    weight.grad, bias.grad = torch.ones(4, 4), torch.ones(4)
    trained.step()
    on_meta = [torch.nn.Parameter(torch.empty(4, 4, device="meta")), torch.nn.Parameter(torch.empty(4, device="meta"))]
    resumed = Muon([{"params": [on_meta[0]], "muon": True}, {"params": [on_meta[1]]}], lr=0.01)
    resumed.load_state_dict(trained.state_dict())
    for param, state in resumed.state.items():
        assert all(t.device == param.device for t in state.values()), state.keys()
    assert resumed.state[on_meta[1]]["step"].dtype == torch.float32


def test_orthogonalize_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    for shape in [(3, 24, 8), (3, 8, 24), (2, 16, 16)]:
        updates = torch.randn(shape) * torch.logspace(-1.5, 0, shape[-1])  # columns 30x apart in scale
        result = orthogonalize(updates)
        singular = torch.linalg.svdvals(result)
        assert singular.min() > 0.6 and singular.max() < 1.25, shape
        # the same directions: the result is close to the exact polar factor U V^T
        u, _, vh = torch.linalg.svd(updates, full_matrices=False)
        polar = u @ vh
        cosine = (result * polar).sum((-2, -1)) / (result.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert cosine.min() > 0.95, shape
        alone = orthogonalize(updates[1:2])  # batching does not mix matrices
        assert torch.allclose(alone[0], result[1], atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 24), (2, 16, 16), (1, 4, 64)])
def test_the_gram_form_does_the_iterations_of_the_direct_form(shape):
    torch.manual_seed(0)
    wide = torch.randn(shape, dtype=torch.float64)  # float64: any difference is the algebra's, not rounding's
    for steps in (1, 2, 5):
        assert torch.allclose(newton_schulz_gram(wide, steps), newton_schulz(wide, steps), atol=1e-10)


def test_muon_step_by_hand():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    start = weight.detach().clone()
    optimizer = Muon([{"params": [weight], "muon": True, "weight_decay": 0.1}], lr=0.05, momentum=0.9)
    grad = torch.randn(6, 4)
    weight.grad = grad.clone()
    optimizer.step()
    nesterov = grad + 0.9 * grad  # momentum buffer = grad after one step
    expected = start * (1 - 0.05 * 0.1) - 0.05 * (6 / 4) ** 0.5 * orthogonalize(nesterov[None])[0]
    assert torch.allclose(weight.detach(), expected, atol=1e-6)
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], grad)


def test_muons_adamw_groups_step_like_torch_adamw():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=32)  # no dropout
    ours, theirs = GPT(config), GPT(config)
    theirs.load_state_dict(ours.state_dict())
    reference = build_optimizer(theirs, TrainConfig(weight_decay=0.1, learning_rate=3e-3), torch.device("cpu"))
    # the same groups (AdamW's: decayed matrices, the rest undecayed), over our copy's parameters
    ours_by_name, names = dict(ours.named_parameters()), {id(p): n for n, p in theirs.named_parameters()}
    groups = [{**g, "params": [ours_by_name[names[id(p)]] for p in g["params"]]} for g in reference.param_groups]
    mine = Muon(groups, lr=3e-3, betas=(0.9, 0.95))
    x, y = torch.randint(0, 32, (4, 16)), torch.randint(0, 32, (4, 16))
    for _ in range(3):
        for model, optimizer in ((ours, mine), (theirs, reference)):
            model(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_muon_learns_and_bad_optimizer_names_are_refused(tmp_path):
    result, _ = run(tmp_path, train_config(max_steps=24, eval_interval=8, optimizer="muon"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.5
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["muon_lr"] == pytest.approx(last["lr"] * 0.02 / 3e-3)  # logged beside AdamW's
    with pytest.raises(GptlabError, match="train.optimizer must be one of adamw, muon"):
        run(tmp_path / "bad", train_config(optimizer="sgd"))
    # a Muon checkpoint cannot resume as AdamW: one line, and the checkpoint is left as it was
    latest = tmp_path / "checkpoints" / (tmp_path / "latest").read_text().strip()
    with pytest.raises(GptlabError, match="trained with train.optimizer muon; resume with --train.optimizer muon"):
        run(tmp_path / "switched", train_config(max_steps=30), resume_from=latest)
    assert (tmp_path / "latest").read_text().strip() == "step-0000024"


def test_a_resumed_run_takes_its_optimizer_settings_from_the_config(tmp_path):
    run(tmp_path / "first", train_config(max_steps=8, optimizer="muon"))
    latest = tmp_path / "first" / "checkpoints" / "step-0000008"
    changed = train_config(max_steps=9, optimizer="muon", muon_momentum=0.5, muon_learning_rate=0.01, beta2=0.9)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    seen = []
    original = Muon.step

    def spy(self, closure=None):
        seen.append([(g.get("muon"), g["lr"], g["momentum"], g["betas"]) for g in self.param_groups])
        return original(self, closure)

    Muon.step = spy
    try:
        train(model, RandomWindows(), changed, tmp_path / "second", Runtime(torch.device("cpu")), resume_from=latest)
    finally:
        Muon.step = original
    (muon, muon_lr, momentum, _), (_, adamw_lr, _, betas) = seen[-1][:2]
    assert muon and momentum == 0.5 and betas == (0.9, 0.9)
    assert muon_lr == pytest.approx(adamw_lr * 0.01 / 3e-3)


def test_accumulation_reaches_target_tokens():
    assert accumulation_steps(TrainConfig(tokens_per_step=None), 64) == 1
    assert accumulation_steps(TrainConfig(tokens_per_step=256), 64) == 4
    assert accumulation_steps(TrainConfig(tokens_per_step=256), 64, world_size=2) == 2
    with pytest.raises(GptlabError, match="tokens_per_step"):
        accumulation_steps(TrainConfig(tokens_per_step=32), 64)


def test_accumulated_step_equals_one_big_batch(tmp_path):
    config = GPTConfig(vocab_size=32, context_length=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    base = GPT(config)
    x = torch.randint(0, 32, (8, 16))
    y = torch.randint(0, 32, (8, 16))
    big = GPT(config)
    big.load_state_dict(base.state_dict())
    big(x, y).backward()
    small = GPT(config)
    small.load_state_dict(base.state_dict())
    for half in (slice(0, 4), slice(4, 8)):
        (small(x[half], y[half]) / 2).backward()
    for (name, a), b in zip(big.named_parameters(), small.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_training_lowers_the_loss_and_writes_metrics_plot_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(gptlab.model, "LOSS_CHUNK_ELEMENTS", 32 * 20)  # the chunked loss, with its kept buffers
    result, _ = run(tmp_path, train_config(max_steps=24, eval_interval=8))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert {"tokens_per_second", "mfu", "lr", "elapsed"} <= set(records[0])
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "latest").read_text().strip() == "step-0000024"
    assert (tmp_path / "best").is_file()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(kept) <= 3 and "step-0000024" in kept
    assert result.step == 24 and math.isfinite(result.best_val_loss)
    assert not vars(gptlab.model._loss_buffers)  # the kept loss buffers are freed when training ends


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, optimizer):
    full, full_model = run(tmp_path / "full", train_config(keep_checkpoints=10, optimizer=optimizer))
    midway = tmp_path / "full" / "checkpoints" / "step-0000008"
    resumed, resumed_model = run(tmp_path / "resumed", train_config(optimizer=optimizer), resume_from=midway)
    assert resumed.train_loss == full.train_loss  # bitwise, dropout included
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    full_log = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in full_log if r["split"] == "train" and r["step"] > 8] == [
        r["loss"] for r in resumed_log if r["split"] == "train"
    ]


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    run(tmp_path, train_config(max_steps=4))

    class Exploding(RandomWindows):
        def loss(self, model, batch):
            return model(batch["input"], batch["target"]) * float("nan")

    latest = ckpt.find_checkpoint(tmp_path)
    with pytest.raises(GptlabError, match="loss became nan"):
        run(tmp_path, train_config(max_steps=8), resume_from=latest, objective=Exploding())
    assert ckpt.find_checkpoint(tmp_path) == latest
    assert ckpt.load_trainer_state(latest)["step"] == 4


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("learning_rate", -1.0), ("beta2", 1.0)])
def test_invalid_train_config_is_refused(tmp_path, field, value):
    with pytest.raises(GptlabError, match=field):
        run(tmp_path, train_config(**{field: value}))


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(GptlabError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(GptlabError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_autocast("fp32", torch.device("cpu")) is None
    assert resolve_autocast("auto", torch.device("cpu")) is None
    with pytest.raises(GptlabError, match="unknown dtype"):
        resolve_autocast("fp8", torch.device("cpu"))


def test_the_loss_plot_draws_the_unigram_baseline(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axhline", lambda ax, y, **kw: drawn.append((y, kw)) or original(ax, y, **kw)
    )
    records = [{"step": 10, "split": "train", "loss": 5.0},
               {"step": 10, "split": "val", "val_loss": 5.5, "unigram_loss": 6.36}]  # fmt: skip
    plot_metrics(records, tmp_path / "loss.png", tokens_per_step=100)
    assert [(y, kw["label"]) for y, kw in drawn] == [(6.36, "unigram baseline 6.36")]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def _write_metrics(run, records):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_overlays_runs_and_reports_last_and_best(tmp_path, capsys):
    from gptlab.cli import main

    for name, losses in (("a", [3.0, 2.5, 2.6]), ("b", [3.0, 2.2, 2.1])):
        records = []
        for step, loss in zip((0, 10, 20), losses, strict=True):
            if step:
                records.append({"step": step, "split": "train", "loss": loss - 0.1, "tokens": step * 100,
                                "elapsed": step * 0.5})  # fmt: skip
            records.append({"step": step, "split": "val", "tokens": step * 100, "val_loss": loss})
        _write_metrics(tmp_path / name, records)
    out = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--x", "time"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert out.stat().st_size > 10_000 and f"plot: {out}" in lines
    assert lines[1].split()[1:] == ["2.6000", "2.5000"] and lines[2].split()[1:] == ["2.1000", "2.1000"]
    assert main(["plot", str(tmp_path / "a"), "--metric", "accuracy", "--out", str(out)]) == 2
    assert "has no 'accuracy' in its metrics; it has val_loss" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_evaluations_are_placed_at_the_training_time_of_their_step():
    from gptlab.train import _plot_positions

    train = [{"step": 10, "elapsed": 4.0}, {"step": 20, "elapsed": 10.0}]
    evals = [{"step": 0}, {"step": 15}, {"step": 20}]
    assert _plot_positions(evals, "time", train) == [0.0, 7.0, 10.0]
    assert _plot_positions([{"step": 3, "tokens": 300}], "tokens", train) == [300]


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")), ids=str)
def test_every_recipe_is_a_valid_run_config(recipe):
    from gptlab.config import load_config_file, resolve_run_config, section_types

    values = load_config_file(recipe)
    assert values["task"] in ("pretrain", "classify", "instruct", "preference")
    sections = [name for name in section_types() if name in values or name == "train"]
    resolved = resolve_run_config(values, sections)
    assert resolved["train"].max_steps > 0 and recipe.read_text().startswith("# ")  # says what it is for


def test_the_gpt_presets_train_at_their_published_learning_rate_unless_one_is_set():
    from gptlab.config import resolve_run_config

    def rate(values):
        return resolve_run_config(values, ["model", "train"])["train"].learning_rate

    assert rate({"preset": "gpt2"}) == 6e-4 and rate({"preset": "gpt3-13b"}) == 1e-4
    assert rate({"preset": "gpt2-xl", "train": {"learning_rate": 1e-3}}) == 1e-3
    assert rate({"preset": "demo"}) == TrainConfig().learning_rate == 2e-3
    assert rate({}) == 6e-4  # GPTConfig's own defaults are GPT-2 small's shape
    # Continued pretraining has no preset, only the model it continues: its shape decides.
    assert rate({"preset": None, "model": {"n_layer": 24, "n_head": 16, "n_embd": 1024}}) == 3e-4
    assert rate({"preset": "gpt2", "model": {"n_layer": 6}}) == 2e-3  # not GPT-2's size any more
    assert rate({"preset": "gpt2", "model": {"n_head": 16}}) == 6e-4  # the same size, other heads


def test_plot_takes_a_classifiers_accuracy_by_its_short_name(tmp_path, capsys):
    run = tmp_path / "spam"
    run.mkdir()
    records = [
        {"step": 1, "split": "train", "loss": 0.9, "tokens": 10},
        {"step": 2, "split": "val", "tokens": 20, "val_loss": 0.7, "val_accuracy": 0.6, "train_accuracy": 0.5},
        {"step": 4, "split": "val", "tokens": 40, "val_loss": 0.5, "val_accuracy": 0.8, "train_accuracy": 0.9},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(run), "--metric", "accuracy", "--out", str(tmp_path / "a.png")]) == 0
    assert re.search(r"spam +0\.8000 +0\.8000", capsys.readouterr().out)  # the validation accuracy
    assert main(["plot", str(run), "--metric", "train_accuracy", "--out", str(tmp_path / "b.png")]) == 0
    assert re.search(r"spam +0\.9000 +0\.9000", capsys.readouterr().out)
    assert main(["plot", str(run), "--metric", "f1", "--out", str(tmp_path / "c.png")]) == 2
    assert "it has train_accuracy, val_accuracy, val_loss" in capsys.readouterr().err
