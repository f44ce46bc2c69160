"""Training objectives: what the one loop (gptlab.train) optimises and how it evaluates.

Each objective supplies micro-batches, the loss on one, evaluation metrics (with `val_loss`, the
number that picks the best checkpoint), a few samples, and its data position for exact resume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gptlab import distributed
from gptlab.config import DataConfig, GPTConfig, TrainConfig
from gptlab.sizing import train_flops_per_token


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the validation tokens under the training tokens' unigram frequencies (add-one).

    The loss a model reaches by learning token frequencies alone: a trained model must beat it.
    """
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(val_tokens)].mean())


class NextTokenObjective:
    """Pretraining: predict every next token of windows drawn from a prepared corpus."""

    def __init__(
        self,
        corpus,
        model_config: GPTConfig,
        data_config: DataConfig,
        train_config: TrainConfig,
        rank: int = 0,
        world_size: int = 1,
    ):
        from gptlab.data import eval_batches, make_sampler

        T = model_config.context_length
        self.corpus = corpus
        self.tokenizer = corpus.tokenizer
        self.sampler = make_sampler(
            corpus.train_tokens, T, train_config.batch_size, kind=data_config.sampler, stride=data_config.stride,
            seed=train_config.seed, rank=rank, world_size=world_size,
        )  # fmt: skip
        self.val_batches = eval_batches(corpus.val_tokens, T, train_config.batch_size, train_config.eval_batches)
        self.tokens_per_batch = train_config.batch_size * T
        self.flops_per_token = train_flops_per_token(model_config, T)
        self.bytes_per_token = float(corpus.meta.get("val_bytes_per_token") or 0.0)
        self.unigram = unigram_loss(corpus.train_tokens, corpus.val_tokens, model_config.vocab_size)
        self.sample_prompts = list(train_config.sample_prompts)
        self.sample_tokens = train_config.sample_tokens
        self.seed = train_config.seed

    def next_batch(self) -> dict[str, torch.Tensor]:
        inputs, targets = self.sampler.next_batch()
        return {"input": inputs, "target": targets}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input"], batch["target"])

    def evaluate(self, model: torch.nn.Module, runtime) -> dict[str, float]:
        # Under torchrun each rank evaluates its share of the batches and the losses are averaged over all.
        val_loss = distributed.mean_over_shares(
            lambda batch: model(batch[0].to(runtime.device), batch[1].to(runtime.device)).float(),
            self.val_batches,
            runtime,
            distributed.is_sharded(model),
        ).item()
        metrics = {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}
        if self.bytes_per_token:
            metrics["bits_per_byte"] = val_loss / math.log(2) / self.bytes_per_token
        metrics["unigram_loss"] = self.unigram
        return metrics

    def samples(self, model: torch.nn.Module, runtime) -> list[str]:
        from gptlab.config import GenerationConfig
        from gptlab.generate import generate

        if not self.sample_prompts or self.sample_tokens <= 0:
            return []
        config = GenerationConfig(max_new_tokens=self.sample_tokens, temperature=0.8, top_k=40, seed=self.seed)
        completions = generate(model, self.tokenizer, self.sample_prompts, config)
        return [prompt + completion for prompt, completion in zip(self.sample_prompts, completions, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        # The text's hash: resuming on edited text is refused unless allowed (gptlab.train.pretrain).
        return {"sampler": self.sampler.state_dict(), "source_sha256": self.corpus.meta.get("source_sha256")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
