"""Data-parallel training with 2 gloo processes on the CPU: DDP and FSDP match one process with the
double batch, accumulation skips the reduction, a killed run resumes exactly, sharded optimizer states
reshard to another number of ranks, and mistakes end every rank with one line from rank 0.

The ranks are forked from a server that has imported torch once, so a group starts in a second or
two rather than paying torch's import in every process.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import signal
import socket
import traceback
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from gptlab import checkpoint as ckpt
from gptlab import distributed
from gptlab.config import GPTConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.sizing import train_flops_per_token
from gptlab.train import Runtime, build_optimizer, make_runtime, train

# No QKV bias: a key bias gets no gradient (softmax ignores it), and Adam would blow its float noise up.
CONFIG = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=32, qkv_bias=False)
HANG_SECONDS = 120
# Imported once by the server the ranks are forked from (the optimizer imports torch._dynamo).
PRELOAD = ["torch", "torch._dynamo", "matplotlib.pyplot", "gptlab.train", "gptlab.distributed", "gptlab.objectives"]


# ---------------------------------------------------------------- running ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out: Path, env: dict, work, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env,
    )  # fmt: skip
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            result = work(*args)
        torch.save({"result": result, "stderr": stderr.getvalue()}, out / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc(), "stderr": stderr.getvalue()}, out / f"rank{rank}.pt")
        raise


def run_ranks(tmp_path: Path, work, *args, world_size: int = 2, env: dict | None = None) -> list[dict]:
    """Run `work(*args)` in `world_size` fresh processes forming a gloo group; each rank's outcome
    (result or error, its stderr, its exit code).

    Fails the test if any rank is still running after HANG_SECONDS.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    out = tmp_path / f"ranks-{_free_port()}"
    out.mkdir()
    port = _free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, out, env or {}, work, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(HANG_SECONDS)
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not hung, f"ranks {hung} were left hanging"
    outcomes = []
    for rank, process in enumerate(processes):
        path = out / f"rank{rank}.pt"
        outcome = torch.load(path, weights_only=False) if path.is_file() else {}
        outcomes.append({**outcome, "exitcode": process.exitcode})
    return outcomes


def results(outcomes: list[dict]) -> list:
    for rank, outcome in enumerate(outcomes):
        assert "error" not in outcome and outcome["exitcode"] == 0, f"rank {rank} failed:\n{outcome.get('error')}"
    return [outcome["result"] for outcome in outcomes]


# ---------------------------------------------------------------- a tiny objective


class GlobalBatches:
    """Windows of a fixed token stream. Every rank draws the same global batch of batch_size x
    world_size rows and trains on its own slice, so two ranks see exactly what one process with the
    double batch sees."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.tokens = torch.arange(600) % 7 + (torch.arange(600) // 50) % 3
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.tokens_per_batch = batch_size * CONFIG.context_length
        self.flops_per_token = train_flops_per_token(CONFIG)

    def next_batch(self):
        T = CONFIG.context_length
        starts = torch.randint(
            0, len(self.tokens) - T - 1, (self.batch_size * self.world_size,), generator=self.generator
        )
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return {
            "input": torch.stack([self.tokens[s : s + T] for s in mine]),
            "target": torch.stack([self.tokens[s + 1 : s + T + 1] for s in mine]),
        }

    def loss(self, model, batch):
        return model(batch["input"], batch["target"])

    def evaluate(self, model, runtime):
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.context_length), generator=g)
        return {"val_loss": model(x, x).item()}

    def samples(self, model, runtime):
        return []

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def train_config(**overrides) -> TrainConfig:
    fields = dict(max_steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=1, eval_interval=2, log_interval=1,
                  eval_batches=1, peak_flops=1e11, seed=0, device="cpu", dtype="fp32", threads=1)  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


def train_ranked(run_dir: Path, config: TrainConfig, resume_from: Path | None = None) -> dict[str, torch.Tensor]:
    """Train on this process's rank (torchrun's environment, or one process); the final weights. The loss
    goes in chunks of 8 rows, as a large vocabulary's would, so the tied head's gradient passes through
    the token embedding's backward (`_TiedEmbedding`) under DDP and FSDP too."""
    import gptlab.model

    runtime = make_runtime(config)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    objective = GlobalBatches(config.batch_size, runtime.rank, runtime.world_size)
    chunk_elements, gptlab.model.LOSS_CHUNK_ELEMENTS = gptlab.model.LOSS_CHUNK_ELEMENTS, CONFIG.vocab_size * 8
    try:
        train(model, objective, config, run_dir, runtime, resume_from=resume_from)
    finally:
        gptlab.model.LOSS_CHUNK_ELEMENTS = chunk_elements
    return ckpt.load_weights(ckpt.find_checkpoint(run_dir) / ckpt.WEIGHTS_FILE)


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=name)


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "parallel, activation_checkpointing, optimizer",
    [("ddp", False, "adamw"), ("fsdp", True, "adamw"), ("ddp", False, "muon"), ("fsdp", False, "muon")],
)
def test_two_ranks_reach_the_weights_of_one_process_with_the_double_batch(
    tmp_path, parallel, activation_checkpointing, optimizer
):
    tokens_per_step = 2 * 2 * 2 * CONFIG.context_length  # 2 micro-steps of 2 ranks x 2 rows
    config = train_config(
        parallel=parallel, activation_checkpointing=activation_checkpointing, tokens_per_step=tokens_per_step,
        optimizer=optimizer,
    )  # fmt: skip
    ranked = results(run_ranks(tmp_path, train_ranked, tmp_path / "two", config))
    single = train_ranked(
        tmp_path / "one", train_config(batch_size=4, tokens_per_step=tokens_per_step, optimizer=optimizer)
    )
    # Muon's iterations multiply the gradient's weakest directions by about 3.4 each, so the all-reduce's
    # rounding grows to ~3e-5 in 4 steps; a missed or doubled reduction would differ by a step, ~2e-3.
    assert_weights_close(ranked[0], single, atol=1e-4 if optimizer == "muon" else 1e-6)
    state = ckpt.load_trainer_state(ckpt.find_checkpoint(tmp_path / "two"))
    assert state["world_size"] == 2 and len(state["objective_ranks"]) == 2
    assert (ckpt.find_checkpoint(tmp_path / "two") / distributed.OPTIMIZER_DIR).is_dir() == (parallel == "fsdp")


def _muon_step_with_split(split: bool) -> dict:
    """One Muon step of a 3-layer model on gradients every rank draws alike: the weights after it, and
    how many matrices this rank orthogonalised."""
    from gptlab import train as train_module

    with cpu_ranks():
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**CONFIG.__dict__, "n_layer": 3}))
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        counted = []
        original = train_module.orthogonalize

        def counting(updates, steps):
            counted.append(updates.size(0))
            return original(updates, steps)

        train_module.orthogonalize = counting
        optimizer = train_module.build_optimizer(
            model, TrainConfig(optimizer="muon"), torch.device("cpu"), data_parallel=split
        )
        optimizer.step()
        return {"weights": model.state_dict(), "orthogonalised": sum(counted)}


def test_muon_splits_its_orthogonalisation_among_ddp_ranks_with_the_same_result(tmp_path):
    split = results(run_ranks(tmp_path, _muon_step_with_split, True))
    whole = results(run_ranks(tmp_path, _muon_step_with_split, False))
    # 3 matrices of each of 4 shapes: rank 0 does 2 of each, rank 1 the third, where one process does all 3.
    assert [r["orthogonalised"] for r in split] == [8, 4]
    assert [r["orthogonalised"] for r in whole] == [12, 12]
    for ranked in split:
        assert_weights_close(ranked["weights"], whole[0]["weights"])


@contextlib.contextmanager
def cpu_ranks(ranks: int = 2):
    """A CPU Runtime for this process's rank of `ranks`, with a gloo group while inside (none for one)."""
    if ranks > 1:
        torch.distributed.init_process_group("gloo")
    try:
        yield Runtime(torch.device("cpu"), rank=torch.distributed.get_rank() if ranks > 1 else 0, world_size=ranks)
    finally:
        if ranks > 1:
            torch.distributed.destroy_process_group()


def _spread_squares(count: int) -> dict:
    """Squares of 0..count-1 computed with distributed.spread_rows on this rank: the rows, and which
    items this rank computed itself."""
    with cpu_ranks() as runtime:
        computed = []

        def squares(items):
            computed.extend(items)
            return torch.tensor([[i, i * i] for i in items], dtype=torch.float32).view(-1, 2)

        return {"rows": distributed.spread_rows(squares, list(range(count)), runtime), "computed": computed}


# Every rank computes as many items (FSDP's ranks must run the same forward passes): the short share
# is filled up with its last item (or the first of all), whose rows are dropped.
@pytest.mark.parametrize("count, shares", [(5, ([0, 1, 2], [3, 4, 4])), (1, ([0], [0]))])
def test_spread_rows_gives_every_rank_all_rows_each_computing_its_share(tmp_path, count, shares):
    ranked = results(run_ranks(tmp_path, _spread_squares, count))
    expected = torch.tensor([[i, i * i] for i in range(count)], dtype=torch.float32)
    for rank, outcome in enumerate(ranked):
        assert outcome["computed"] == shares[rank]
        assert torch.equal(outcome["rows"], expected)


def _answer_records(ranks: int, parallel: str | None = None) -> dict:
    """Greedy answers of a seeded byte-level model to five instruction records, on this rank of
    `ranks` (FSDP-sharded if `parallel` is fsdp): the answers and how many records this rank answered."""
    from gptlab import instruct
    from gptlab.templates import get_template
    from gptlab.tokenizer import ByteTokenizer

    with cpu_ranks(ranks) as runtime:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=257, context_length=256, n_layer=1, n_head=2, n_embd=16)).eval()
        if parallel:
            distributed.parallelize(model, train_config(parallel=parallel), runtime)
        answered, generate = [], instruct.generate_responses

        def counting(model, tokenizer, prompts, *args):
            answered.extend(prompts)
            return generate(model, tokenizer, prompts, *args)

        instruct.generate_responses = counting
        records = [{"instruction": f"Name {word} things.", "input": "", "output": word} for word in "abcde"]
        answers = instruct.answer_records(model, ByteTokenizer(), records, get_template("alpaca"), 6, runtime)
        return {"answers": answers, "answered": len(answered)}


def test_ranks_answer_their_share_of_the_records_and_all_get_every_answer(tmp_path):
    ranked = results(run_ranks(tmp_path, _answer_records, 2))
    single = _answer_records(1)
    assert single["answered"] == 5 and [r["answered"] for r in ranked] == [3, 2]
    assert ranked[0]["answers"] == ranked[1]["answers"] == single["answers"]
    assert [a["output"] for a in single["answers"]] == list("abcde")  # in the records' order


def test_a_sharded_models_ranks_answer_every_record_in_step(tmp_path):
    # Rows of different shares end after different numbers of steps; FSDP's ranks must run the same forwards.
    ranked = results(run_ranks(tmp_path, _answer_records, 2, "fsdp"))
    assert [r["answered"] for r in ranked] == [5, 5]
    assert ranked[0]["answers"] == ranked[1]["answers"] == _answer_records(1)["answers"]


def _fsdp_muon_steps(parallel: str | None) -> dict[str, torch.Tensor]:
    """Three Muon steps of a 4-wide model on one fixed batch, sharded by FSDP over the ranks or whole:
    the whole weights after them. 4 rows over 3 ranks leave the third rank an empty shard."""
    from gptlab.train import make_runtime

    config = train_config(parallel=parallel or "auto", optimizer="muon")
    runtime = make_runtime(config) if parallel else Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context_length=16, n_layer=1, n_head=1, n_embd=4))
    stepper = distributed.parallelize(model, config, runtime)
    optimizer = build_optimizer(model, config, runtime.device, data_parallel=parallel is not None)
    batch = GlobalBatches(4).next_batch()  # the same rows on every rank
    for _ in range(3):
        stepper(batch["input"], batch["target"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: getattr(t, "full_tensor", lambda t=t: t)().detach().clone() for name, t in model.state_dict().items()}


def test_muon_steps_fsdp_shards_of_every_size_like_whole_matrices(tmp_path):
    ranked = results(run_ranks(tmp_path, _fsdp_muon_steps, "fsdp", world_size=3))
    assert_weights_close(ranked[0], _fsdp_muon_steps(None), atol=1e-5)


@pytest.mark.parametrize(
    "parallel, first, then, optimizer", [("fsdp", 2, 1, "adamw"), ("ddp", 1, 2, "adamw"), ("fsdp", 2, 1, "muon")]
)
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, parallel, first, then, optimizer):
    # The global batch stays 4 rows; GlobalBatches keeps its data order whatever the number of ranks.
    def run(ranks: int, run_dir: Path, resume_from: Path | None = None) -> dict[str, torch.Tensor]:
        config = train_config(
            parallel=parallel, batch_size=4 // ranks, tokens_per_step=4 * CONFIG.context_length, max_steps=6,
            optimizer=optimizer,
        )  # fmt: skip
        if ranks == 1:
            return train_ranked(run_dir, config, resume_from)
        return results(run_ranks(tmp_path, train_ranked, run_dir, config, resume_from))[0]

    uninterrupted = run(first, tmp_path / "first")
    resumed = run(then, tmp_path / "then", resume_from=tmp_path / "first" / "checkpoints" / "step-0000004")
    assert_weights_close(resumed, uninterrupted, atol=1e-4 if optimizer == "muon" else 1e-6)


def _gradients_after_backward(parallel: str, sync: bool) -> dict[str, torch.Tensor | None]:
    config = train_config(parallel=parallel)
    runtime = make_runtime(config)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    stepper = distributed.parallelize(model, config, runtime)
    batch = GlobalBatches(2, runtime.rank, runtime.world_size).next_batch()
    with distributed.gradient_sync(stepper, sync):
        stepper(batch["input"], batch["target"]).backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def test_accumulation_micro_steps_skip_the_gradient_reduction(tmp_path):
    local = results(run_ranks(tmp_path, _gradients_after_backward, "ddp", False))
    assert not torch.equal(local[0]["ln_f.weight"], local[1]["ln_f.weight"])  # each rank keeps its own
    synced = results(run_ranks(tmp_path, _gradients_after_backward, "ddp", True))
    assert all(torch.equal(synced[0][name], synced[1][name]) for name in synced[0])
    # FSDP keeps unreduced gradients to itself until the step's last micro-batch: no shard has one yet.
    sharded_local = results(run_ranks(tmp_path, _gradients_after_backward, "fsdp", False))
    assert all(grad is None for grad in sharded_local[0].values())


def test_activation_checkpointing_keeps_the_gradients():
    config = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    torch.manual_seed(0)
    plain = GPT(config)
    checkpointed = GPT(config)
    checkpointed.load_state_dict(plain.state_dict())
    distributed.checkpoint_blocks(checkpointed)
    assert all(hasattr(block, "_checkpoint_wrapped_module") for block in checkpointed.blocks)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    x = torch.randint(0, 32, (4, 16))
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays them in the recomputation
        model(x, x.roll(1, dims=1)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


# ---------------------------------------------------------------- a killed run resumes exactly


def _pretrain(values: dict, resume: bool = False, kill_at_batch: int = 0) -> list[float]:
    """Pretrain on this rank; with `kill_at_batch`, SIGKILL this process when it draws that batch."""
    from gptlab.objectives import NextTokenObjective
    from gptlab.train import pretrain

    if kill_at_batch:
        draw = NextTokenObjective.next_batch
        drawn = []

        def next_batch_or_die(self):
            drawn.append(1)
            if len(drawn) == kill_at_batch:
                os.kill(os.getpid(), signal.SIGKILL)
            return draw(self)

        NextTokenObjective.next_batch = next_batch_or_die
    pretrain(values, resume=resume)
    return [r["loss"] for r in _records(Path(values["out_dir"]), "train")]


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture
def corpus(tmp_path) -> Path:
    generator = torch.Generator().manual_seed(0)
    words = ["the", "model", "reads", "every", "token", "and", "learns", "which", "one", "comes", "next", "."]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (6000,), generator=generator))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def pretrain_values(corpus: Path, out_dir: Path, **train) -> dict:
    return {
        "out_dir": str(out_dir),
        "preset": None,
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_length": 32, "dropout": 0.1},
        "data": {"source": str(corpus), "tokenizer": "byte"},
        "train": {
            "max_steps": 8, "batch_size": 2, "eval_interval": 4, "eval_batches": 1, "log_interval": 1,
            "warmup_steps": 1, "learning_rate": 3e-3, "sample_tokens": 0, "peak_flops": 1e11, "device": "cpu",
            "dtype": "fp32", "threads": 1, "seed": 0, **train,
        },
    }  # fmt: skip


def _fail_in_rank_ones_share(helper: str, sharded: bool = False) -> None:
    """spread_rows, mean_over_shares or spread_items where computing rank 1's share raises."""
    with cpu_ranks() as runtime:

        def compute(items):
            if runtime.rank == 1:
                raise ValueError("a bad example")
            if helper == "mean_over_shares":  # one item at a time
                return torch.tensor(0.0)
            return torch.zeros(len(items), 1) if helper == "spread_rows" else items

        if helper == "spread_items":
            distributed.spread_items(compute, [1, 2, 3, 4], runtime)
        else:
            getattr(distributed, helper)(compute, [1, 2, 3, 4], runtime, sharded)


@pytest.mark.parametrize("helper", ["spread_rows", "mean_over_shares", "spread_items"])
def test_an_error_in_one_ranks_share_stops_every_rank(tmp_path, helper):
    outcomes = run_ranks(tmp_path, _fail_in_rank_ones_share, helper)  # fails the test if a rank hangs
    assert "rank 1: ValueError: a bad example" in outcomes[0]["error"]
    assert "ValueError: a bad example" in outcomes[1]["error"]


def test_under_fsdp_the_failing_rank_raises_its_own_error(tmp_path):
    # FSDP's other ranks wait in its own collectives, where no error can be shared: the failing rank
    # must not enter another collective (which gloo would abort the process for), only raise.
    outcomes = run_ranks(tmp_path, _fail_in_rank_ones_share, "spread_rows", True)
    assert "ValueError: a bad example" in outcomes[1]["error"] and outcomes[1]["exitcode"] == 1
    assert outcomes[0]["exitcode"] != 0  # its collective lost its peer: an error, not a hang


def _evaluate_pretraining(values: dict) -> dict:
    """The pretraining objective's metrics for a seeded model on this rank (wrapped as the run's
    train.parallel says), and how many forward passes this rank ran for them."""
    from gptlab.config import resolve_run_config
    from gptlab.data import prepare_corpus
    from gptlab.objectives import NextTokenObjective
    from gptlab.train import make_runtime

    config = resolve_run_config(values, ["model", "data", "train"])
    runtime = make_runtime(config["train"])
    with distributed.main_first(runtime):
        corpus = prepare_corpus(config["data"], cache=Path(values["out_dir"]) / "cache")
    model_config = GPTConfig(**{**config["model"].__dict__, "vocab_size": corpus.tokenizer.vocab_size})
    objective = NextTokenObjective(
        corpus, model_config, config["data"], config["train"], runtime.rank, runtime.world_size
    )
    torch.manual_seed(0)
    model = GPT(model_config).eval()
    stepper = distributed.parallelize(model, config["train"], runtime)
    passes = []
    stepper.register_forward_hook(lambda *args: passes.append(1))
    with torch.no_grad():
        metrics = objective.evaluate(stepper, runtime)
    return {"metrics": metrics, "passes": len(passes)}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ranks_share_the_validation_batches_and_agree_with_one_process(tmp_path, corpus, parallel):
    # 3 batches on 2 ranks: rank 0 evaluates 2, rank 1 one, and once more without counting it (FSDP's
    # ranks must run the same forward passes).
    values = pretrain_values(corpus, tmp_path / "ranks", eval_batches=3, parallel=parallel)
    values["model"]["dropout"] = 0.0
    ranked = results(run_ranks(tmp_path, _evaluate_pretraining, values))
    single = _evaluate_pretraining({**values, "out_dir": str(tmp_path / "one")})
    assert single["passes"] == 3 and [r["passes"] for r in ranked] == [2, 2]
    for outcome in ranked:
        assert outcome["metrics"]["val_loss"] == pytest.approx(single["metrics"]["val_loss"], rel=1e-6)


def _evaluate_classifier(ranks: int) -> dict[str, float]:
    """A seeded classifier's validation metrics from the classification objective, on this rank."""
    from gptlab.classify import GPTClassifier
    from test_classify import CONFIG as CLASSIFIER_CONFIG
    from test_classify import make_objective

    with cpu_ranks(ranks) as runtime:
        objective = make_objective(rank=runtime.rank, world_size=ranks)
        torch.manual_seed(0)
        model = GPTClassifier(CLASSIFIER_CONFIG, 2).eval()
        with torch.no_grad():
            return objective.evaluate(model, runtime)


def test_ranks_share_a_classifiers_validation_and_agree_with_one_process(tmp_path):
    ranked = results(run_ranks(tmp_path, _evaluate_classifier, 2))
    single = _evaluate_classifier(1)
    for metrics in ranked:
        assert metrics.keys() == single.keys()
        for name, value in single.items():
            assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def _greedy_tokens(parallel: str | None) -> list[list[int]]:
    """Greedy continuations from a seeded model, sharded by FSDP across the ranks or whole."""
    from gptlab.config import GenerationConfig
    from gptlab.generate import generate_ids
    from gptlab.train import make_runtime

    config = train_config(parallel=parallel or "auto")
    runtime = make_runtime(config) if parallel else Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(CONFIG)
    distributed.parallelize(model, config, runtime)
    return generate_ids(model, [[1, 2, 3], [4, 5]], GenerationConfig(temperature=0.0, max_new_tokens=8))


def test_a_sharded_model_generates_what_the_whole_model_does(tmp_path):
    # Every rank decodes the same prompts in lockstep; the decoding head must not copy a sharded weight.
    ranked = results(run_ranks(tmp_path, _greedy_tokens, "fsdp"))
    assert ranked[0] == ranked[1] == _greedy_tokens(None)


def test_a_killed_distributed_run_resumes_exactly(tmp_path, corpus):
    env = {"GPTLAB_CACHE": str(tmp_path / "cache")}
    straight = results(run_ranks(tmp_path, _pretrain, pretrain_values(corpus, tmp_path / "straight"), env=env))[0]
    values = pretrain_values(corpus, tmp_path / "killed")
    killed = run_ranks(tmp_path, _pretrain, values, False, 6, env=env)
    assert [outcome["exitcode"] for outcome in killed] == [-signal.SIGKILL] * 2
    assert (tmp_path / "killed" / "latest").read_text().strip() == "step-0000004"
    resumed = results(run_ranks(tmp_path, _pretrain, values, True, env=env))[0]
    assert resumed == straight  # bitwise: both ranks' data positions and dropout RNG were restored
    assert len(straight) == 8
    assert _records(tmp_path / "killed", "val") == _records(tmp_path / "straight", "val")
    straight_weights, resumed_weights = (
        ckpt.load_weights(ckpt.find_checkpoint(tmp_path / run) / ckpt.WEIGHTS_FILE) for run in ("straight", "killed")
    )
    assert all(torch.equal(straight_weights[name], resumed_weights[name]) for name in straight_weights)


# ---------------------------------------------------------------- mistakes


def _cli(argv: list[str]) -> int:
    from gptlab.cli import main

    return main(argv)


def _pretrain_argv(corpus: Path, out: Path, *options: str) -> list[str]:
    values = pretrain_values(corpus, out)
    argv = ["pretrain", "--out", str(out)]
    for section in ("model", "data", "train"):
        argv += [item for name, value in values[section].items() for item in (f"--{section}.{name}", str(value))]
    return argv + list(options)


def assert_one_error_line_from_rank_zero(outcomes: list[dict], fragment: str) -> None:
    assert [outcome["result"] for outcome in outcomes] == [2, 2]  # every rank stops with the usage error code
    rank_zero = outcomes[0]["stderr"].strip().splitlines()
    assert len(rank_zero) == 1 and rank_zero[0].startswith("error: ") and fragment in rank_zero[0], rank_zero
    assert outcomes[1]["stderr"] == ""


def test_a_batch_the_ranks_cannot_share_is_one_error_on_rank_zero(tmp_path, corpus):
    env = {"GPTLAB_CACHE": str(tmp_path / "cache")}
    argv = _pretrain_argv(corpus, tmp_path / "run", "--train.tokens_per_step", "192")  # 2 ranks x 64 tokens
    outcomes = run_ranks(tmp_path, _cli, argv, env=env)
    assert_one_error_line_from_rank_zero(outcomes, "does not split evenly over 2 ranks")


def test_resuming_on_other_ranks_that_change_the_step_size_is_one_error_on_rank_zero(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    assert _cli(_pretrain_argv(corpus, tmp_path / "run", "--train.max_steps", "4")) == 0  # one process
    outcomes = run_ranks(tmp_path, _cli, ["pretrain", "--resume", str(tmp_path / "run")], env={})
    assert_one_error_line_from_rank_zero(outcomes, "trained on 1 rank(s) with 64 tokens per step")


def test_a_missing_source_found_by_rank_zero_stops_every_rank(tmp_path, corpus):
    env = {"GPTLAB_CACHE": str(tmp_path / "cache")}
    argv = _pretrain_argv(corpus, tmp_path / "run", "--data.source", str(tmp_path / "absent.txt"))
    outcomes = run_ranks(tmp_path, _cli, argv, env=env)
    assert [outcome["result"] for outcome in outcomes] == [2, 2]
    assert outcomes[0]["stderr"].count("error: ") == 1 and outcomes[1]["stderr"] == ""


def _fail_on_rank(failing_rank: int) -> str:
    runtime = make_runtime(train_config())
    try:
        with distributed.all_or_none(runtime):
            if runtime.rank == failing_rank:
                raise GptlabError("could not write the checkpoint: disk full")
    except GptlabError as exc:
        return str(exc)
    return "no error"


def test_a_mistake_on_one_rank_reaches_every_rank(tmp_path):
    messages = results(run_ranks(tmp_path, _fail_on_rank, 1))
    assert messages == ["rank 1: could not write the checkpoint: disk full"] * 2


def test_devices_and_modes_without_a_distributed_backend_are_refused(monkeypatch):
    with pytest.raises(GptlabError, match="mps has no distributed backend"):
        distributed.start(Runtime(torch.device("mps"), world_size=2), TrainConfig(parallel="fsdp"))
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(GptlabError, match="needs NCCL"):
        distributed.start(Runtime(torch.device("cuda", 0), world_size=2), TrainConfig(parallel="fsdp"))
    with pytest.raises(GptlabError, match="unknown train.parallel 'zero3'"):
        distributed.start(Runtime(torch.device("cpu"), world_size=2), TrainConfig(parallel="zero3"))
    assert distributed.parallel_mode(TrainConfig(parallel="fsdp"), world_size=1) == "none"
    assert distributed.parallel_mode(TrainConfig(), world_size=2) == "ddp"


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    assert distributed.world_from_env() == distributed.World()
    for name, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.world_from_env() == distributed.World(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert distributed.rank_device(torch.device("cuda"), distributed.world_from_env()) == torch.device("cuda", 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(GptlabError, match="outside WORLD_SIZE 4"):
        distributed.world_from_env()


# ---------------------------------------------------------------- torchrun, end to end


def test_torchrun_runs_the_pretrain_command_with_fsdp(tmp_path, corpus):
    argv = _pretrain_argv(
        corpus, tmp_path / "run", "--train.parallel", "fsdp", "--activation-checkpointing",
        "--train.max_steps", "4", "--train.sample_tokens", "4",
    )  # fmt: skip
    done = run_torchrun(argv, tmp_path, tmp_path / "run", timeout=HANG_SECONDS)
    assert done.stdout.count("done: 4 steps") == 1  # rank 0 prints, rank 1 is quiet
    assert done.stdout.count("sample | ") == 1
    checkpoint = ckpt.find_checkpoint(tmp_path / "run")
    assert (checkpoint / distributed.OPTIMIZER_DIR / ".metadata").is_file()
    assert _cli(["generate", str(tmp_path / "run"), "the", "--max-new-tokens", "3", "--seed", "0"]) == 0
