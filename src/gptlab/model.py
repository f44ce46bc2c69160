"""The GPT: GPT-2's architecture exactly, read top to bottom. Config, attention, MLP, block, model, KV cache.

Shapes in comments: B batch, T new positions, S attended positions (cache included), C width,
H heads, D head width, V vocabulary.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gptlab import machine
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError


class Linear(nn.Linear):
    """`nn.Linear`, whose fp32 products on a CPU run on the kernel this machine measured fastest
    (`machine.linear`: oneDNN or torch's MKL, which runs AVX2 code on AMD processors)."""

    def forward(self, x):
        return machine.linear(x, self.weight, self.bias)


def plain_linear(module: nn.Module | None) -> bool:
    """Whether `module` computes `F.linear` with its weight and bias (to fp32's rounding, whichever kernel
    runs it) and nothing else: this `Linear` or torch's."""
    return type(module) in (Linear, nn.Linear)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and PyTorch's SDPA kernels."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, causal=True, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D)
        dropout_p = self.dropout if self.training else 0.0
        if causal and mask is None and _products_pay(q, k):
            y = _attention_by_products(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return _dropped(self.resid_dropout, self.proj(y))


# Longest context whose causal attention a CPU computes faster as two batched products and a softmax than
# with SDPA's flash kernel, by dtype (docs/benchmarks.md): flash works block by block and skips the masked
# half, which pays only once the (T, T) scores outgrow the caches. In bf16 the products run on the bf16
# units and flash's backward does not (bpe-mini's step 805 -> 646 ms); in fp32 they win up to 128.
PRODUCTS_MAX_CONTEXT = {torch.bfloat16: 512, torch.float32: 128}
PRODUCTS_MAX_SCORES = 2**25  # B * H * T * T: the softmax kept for backward, at most 64 MiB a layer in bf16


def _products_pay(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether causal attention of q over k (no cache offset) is faster as `_attention_by_products` here."""
    B, H, T, _ = q.shape
    return (
        q.device.type == "cpu"
        and k.shape[-2] == T
        and T <= PRODUCTS_MAX_CONTEXT.get(q.dtype, 0)
        and B * H * T * T <= PRODUCTS_MAX_SCORES
    )


def _attention_by_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v with the whole (T, T) scores held, in the inputs' dtype (bf16 scores
    under autocast, as transformers' and nanoGPT's eager attention have them; flash keeps them in fp32)."""
    B, H, T, D = q.shape
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(future, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D**-0.5)
    weights = scores.softmax(-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return torch.bmm(weights, v.reshape(B * H, T, D)).view(B, H, T, D)


def _dropped(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`dropout(x)`, skipped where it is the identity (evaluation, or p = 0): a call of the module costs
    microseconds, and a decoded token passes 19 of them in a 6-layer model."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


class MLP(nn.Module):
    """The position-wise feed-forward network: 4x wider, GELU with GPT-2's tanh approximation."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return _dropped(self.dropout, self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, causal=True, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, a stack of blocks, a final LayerNorm and the LM head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.context_length, config.n_embd)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        # Positions as a buffer so decoding slices it instead of allocating each step.
        self.register_buffer("position_ids", torch.arange(config.context_length), persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer).
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters counted once (a tied head is the embedding); optionally without the embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.weight.numel() + self.position_embedding.weight.numel()
        return total

    def hidden_states(
        self,
        idx,
        attention_mask=None,
        positions=None,
        cache: KVCache | None = None,
        *,
        tied: _TiedGradient | None = None,
    ):
        """The final normalised hidden states (B, T, C), before the LM head.

        attention_mask (B, T) marks real tokens (1) and padding (0); positions (B, T) override the
        position ids (by default counted over real tokens only, so left padding does not shift them).
        `tied` is `forward`'s link from the token embedding's gradient to the tied head's loss.
        """
        if idx.dim() != 2 or idx.is_floating_point():
            hint = "; one sequence is idx[None]" if idx.dim() == 1 else ""
            raise GptlabError(
                f"the model takes token ids (integers) of shape (batch, time), got {idx.dtype} of shape "
                f"{tuple(idx.shape)}{hint}"
            )
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context_length:
            raise GptlabError(
                f"sequence of {past + T} positions exceeds the model's context length "
                f"{self.config.context_length}; shorten the input or slide the window"
            )
        mask, causal = None, True
        if cache is not None:
            positions, mask, causal = cache.prepare(T, attention_mask, positions, self.position_ids)
        elif attention_mask is not None:
            mask = padding_causal_mask(attention_mask.bool(), T, 0)
            if positions is None:
                positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if positions is None:
            positions = self.position_ids[past : past + T]
        if tied is None:
            tokens = self.token_embedding(idx)
        else:  # the lookup's gradient joins the tied head's (training with the chunked loss)
            tokens = _TiedEmbedding.apply(idx, self.token_embedding.weight, tied)
        x = tokens + self.position_embedding(positions)  # (B, T, C)
        x = _dropped(self.embedding_dropout, x)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, causal, cache, layer)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def forward(
        self,
        idx,
        targets=None,
        attention_mask=None,
        positions=None,
        cache: KVCache | None = None,
        last_only=False,
        reduction: str = "mean",
    ):
        """Logits (B, T, V), or (B, 1, V) with `last_only`; with `targets` (B, T), the mean next-token loss,
        or with `reduction="none"` each position's loss (B, T), 0 where there is no target.

        The loss lives in forward (not in a separate call on the head) so that DDP, FSDP and
        torch.compile see the whole computation; it is computed in chunks so the (B*T, V) logits
        are never held at once (IGNORE_INDEX, -100, marks positions without a target).
        """
        tied = _TiedGradient() if self._links_tied_gradient(targets, reduction) else None
        if tied is None:
            hidden = self.hidden_states(idx, attention_mask, positions, cache)
        else:
            hidden = self.hidden_states(idx, attention_mask, positions, cache, tied=tied)
        if targets is not None:
            hidden, weight = hidden.flatten(0, 1), self.lm_head.weight
            if hasattr(self.lm_head, "matmul_operands"):  # a head with LoRA adapters (gptlab.lora)
                hidden, weight = self.lm_head.matmul_operands(hidden)
            if reduction not in ("mean", "none"):
                raise GptlabError(f"reduction must be 'mean' or 'none', got {reduction!r}")
            if reduction == "none":
                return token_losses(hidden, weight, targets.flatten()).view(targets.shape)
            return linear_cross_entropy(hidden, weight, targets.flatten(), tied=tied)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    def _links_tied_gradient(self, targets, reduction: str) -> bool:
        """Whether this forward's token embedding adds its gradient into the chunked loss's gradient of
        the tied head (`_TiedEmbedding`): training a plain tied GPT on a CPU, not compiled. (A GPU fills
        and adds a (V, C) gradient in a fraction of a millisecond, and its `index_add_` is not
        deterministic.)"""
        if targets is None or reduction != "mean" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        embedding, weight = self.token_embedding, self.token_embedding.weight
        if targets.numel() <= loss_chunk_rows(weight):  # plain cross-entropy, not chunks
            return False
        if torch._C._are_functorch_transforms_active():  # torch.func's transforms take no such Functions
            return False
        if weight.device.type != "cpu" or self.lm_head.weight is not weight or not weight.requires_grad:
            return False
        if not weight.is_leaf or type(embedding) is not nn.Embedding or not plain_linear(self.lm_head):
            return False
        if type(self).hidden_states is not GPT.hidden_states:  # a subclass's own may not take `tied`
            return False
        options = (embedding.padding_idx, embedding.max_norm, embedding.scale_grad_by_freq, embedding.sparse)
        return options == (None, None, False, False) and not ("forward" in vars(embedding) or _hooked(embedding))


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs forward hooks: its own, or global ones (profilers and tracers install
    those), which code that skips the module call would skip too."""
    modules = torch.nn.modules.module
    own = module._forward_hooks or module._forward_pre_hooks
    return bool(own or modules._global_forward_hooks or modules._global_forward_pre_hooks)


class _TiedGradient:
    """The chunked loss's gradient of a tied head, passed by the loss's backward (which gives autograd
    none for the weight) to the token embedding's backward of the same forward, which adds its rows into
    it and gives autograd the sum: no zero-filled (V, C) gradient of its own and no (V, C) sum of the two
    a step (docs/benchmarks.md). (Adding into a gradient already given to autograd would be lost when
    autograd has summed it with another, as for two losses of one backward.)"""

    __slots__ = ("weight_grad", "task")

    def __init__(self):
        self.weight_grad: torch.Tensor | None = None
        self.task = -1  # the backward pass (autograd's graph task) that passed it

    def hand_over(self, weight_grad: torch.Tensor) -> None:
        self.weight_grad, self.task = weight_grad, torch._C._current_graph_task_id()

    def take(self) -> torch.Tensor | None:
        """The loss's gradient if this backward pass passed it (one that asked for other gradients only
        may have passed one and never reached the embedding: it is not for a later pass)."""
        weight_grad, self.weight_grad = self.weight_grad, None
        return weight_grad if self.task == torch._C._current_graph_task_id() else None


class _TiedEmbedding(torch.autograd.Function):
    """The token embedding's lookup, its weight gradient added into the tied head's (`_TiedGradient`).

    When the loss's backward has passed no gradient over in this backward pass (a backward from the
    hidden states only), it makes its own, as `F.embedding` would."""

    @staticmethod
    def forward(ctx, idx, weight, tied):
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_output):
        (idx,) = ctx.saved_tensors
        grad_weight = ctx.tied.take()
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        if grad_weight is None:
            own = rows.new_zeros(ctx.weight_shape).index_add_(0, idx.reshape(-1), rows)
            return None, own, None
        return None, grad_weight.index_add_(0, idx.reshape(-1), rows.to(grad_weight.dtype)), None


# Target id of positions without a target: the losses skip them (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

# Logits chunks of about this many elements (64 MiB in fp32) bound the loss's memory.
LOSS_CHUNK_ELEMENTS = 1 << 24


def loss_chunk_rows(weight) -> int:
    """Rows of logits a chunk of the loss holds for this head (V, C)."""
    return max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = IGNORE_INDEX, tied: _TiedGradient | None = None):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, without materialising all logits.

    hidden (N, C), weight (V, C), targets (N,). In training the gradients are computed chunk by chunk
    during the forward pass (softmax minus one-hot), so only one chunk of fp32 logits exists at a time
    and nothing is recomputed (under bf16 autocast the bf16 d-logits of up to 256 MiB of rows are kept
    for one weight-gradient product); the softmax and the loss are always in fp32. Logits that fit in one
    chunk take plain cross-entropy, which has fewer small kernels (docs/benchmarks.md).
    """
    hidden, targets = targeted_rows(hidden, targets, ignore_index)
    chunk_rows = loss_chunk_rows(weight)
    if hidden.shape[0] <= chunk_rows:
        dtype = _compute_dtype(hidden)
        logits = machine.linear(hidden.to(dtype), weight.to(dtype)).float()
        count = (targets != ignore_index).sum().clamp(min=1)  # all ignored: 0, not NaN, as in chunks
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / count
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, tied)
    return _chunked_loss(hidden, weight, targets, ignore_index, chunk_rows, None)[0]


def targeted_rows(hidden, targets, ignore_index: int = IGNORE_INDEX):
    """The rows of `hidden` (N, C) and `targets` (N,) that have a target: instruction data's prompt
    positions need no logits, and the head's product is most of a small model's step (docs/benchmarks.md).
    Under torch.compile all rows stay: the selection's shape depends on the data."""
    if torch.compiler.is_compiling():
        return hidden, targets
    targeted = targets != ignore_index
    if bool(targeted.all()):  # pretraining: every position has a target
        return hidden, targets
    rows = targeted.nonzero().squeeze(1)
    return hidden.index_select(0, rows), targets.index_select(0, rows)


def token_losses(hidden, weight, targets, ignore_index: int = IGNORE_INDEX):
    """Each row's cross-entropy of `hidden @ weight.T` against `targets` (N,), 0 where the target is ignored.

    For losses that weigh sequences apart (DPO sums a response's log-probabilities). Only rows with a
    target go through the head, in chunks; under autograd each chunk's logits are recomputed in the
    backward pass instead of being kept, so memory stays one chunk of logits whatever the length.
    """
    from torch.utils.checkpoint import checkpoint

    losses = hidden.new_zeros(targets.shape, dtype=torch.float32)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    chunk_rows = loss_chunk_rows(weight)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, rows.numel(), chunk_rows):
        index = rows[start : start + chunk_rows]
        h, t = hidden.index_select(0, index), targets.index_select(0, index)
        if keep_graph and rows.numel() > chunk_rows:
            pieces.append(checkpoint(_chunk_losses, h, weight, t, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(h, weight, t))
    if pieces:
        losses = losses.index_put((rows,), torch.cat(pieces))
    return losses


def _chunk_losses(hidden, weight, targets):
    dtype = _compute_dtype(hidden)
    logits = machine.linear(hidden.to(dtype), weight.to(dtype)).float()
    return F.cross_entropy(logits, targets, reduction="none")


def _compute_dtype(tensor):
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


# Under mixed precision the d-logits of several chunks are kept (in the compute dtype, up to this many
# elements: 256 MiB in bf16) for one weight-gradient product: adding each chunk's low-precision (V, C)
# product into the fp32 gradient costs a conversion and an add of the whole (V, C) a chunk, more than
# the product itself (docs/benchmarks.md).
LOSS_STORED_GRAD_ELEMENTS = 1 << 27
# Where oneDNN computes the fp32 logits (a fresh tensor each chunk), chunks stay under glibc's largest
# mmap threshold (32 MiB), so that each one reuses the memory the last one freed instead of new pages
# (64 MiB of them cost 25 ms to fault in on a Zen 5). On a CPU.
ONEDNN_LOGITS_ELEMENTS = (machine.MALLOC_MMAP_THRESHOLD - (64 << 10)) // 4  # less malloc's own header room
LOGPROB_BLOCK_ROWS = 32  # rows of low-precision logits converted to fp32 at a time: 6 MiB for GPT-2's vocabulary


_loss_buffers = threading.local()


def _loss_buffer(name: str, shape: tuple[int, int], dtype, device) -> torch.Tensor:
    """A buffer of the chunked loss, kept from one call to the next in this thread (grown when too small).

    A fresh tensor this large is fresh pages that the kernel faults in and zeroes on first touch, about
    0.4 ms per MiB on a CPU: for bpe-mini's 270 MiB of logits that was about a tenth of a bf16 step
    (docs/benchmarks.md). Held at the size of the largest loss so far, which training reaches anyway."""
    if device.type != "cpu" or torch.compiler.is_compiling():  # CUDA's caching allocator reuses memory itself
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _loss_buffers.__dict__
    key, numel = (name, dtype, device), shape[0] * shape[1]
    buffer = buffers.get(key)
    # A buffer made under inference mode is an inference tensor, which may not be written outside it.
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or buffer.numel() < numel or stale:
        buffers.pop(key, None)  # free the old one before the new one is made
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def _head_gradient(weight) -> torch.Tensor:
    """An fp32 tensor for the head's (V, C) gradient. On a CPU it lies in a kept buffer whenever nothing
    holds that buffer any more (the last step's gradient was set to None, or autograd added it into the
    parameter's own): a fresh 77 MB tensor is pages that the first product's write faults in, 12-19 ms a
    bpe-mini step (docs/benchmarks.md). A buffer still held (a gradient kept by `zero_grad(set_to_none=
    False)` or accumulated over micro-steps) is left alone and a new one is kept instead."""
    if weight.device.type != "cpu" or torch.compiler.is_compiling() or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty_like(weight, dtype=torch.float32)
    buffers = _loss_buffers.__dict__
    kept = buffers.get("head gradient")
    if kept is None or kept[0].shape != weight.shape or _storage_users(kept[0]) != kept[1]:
        buffer = torch.empty_like(weight, dtype=torch.float32, memory_format=torch.contiguous_format)
        buffers["head gradient"] = kept = (buffer, _storage_users(buffer))  # the count while only kept here
    # A tensor of its own over the buffer, which autograd may keep as .grad; not a view (made here without
    # gradients, a view could not be written in place under create_graph=True).
    return kept[0].detach()


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors (and storage objects) hold `tensor`'s memory (what torch's CUDA-graph trees ask too)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def release_loss_buffers() -> None:
    """Free this thread's kept loss buffers (about 370 MB after training bpe-mini under bf16, 145 MB in
    fp32); the next loss makes them again. Training calls it when it ends."""
    _loss_buffers.__dict__.clear()


def _chunked_loss(hidden, weight, targets, ignore_index, chunk_rows, grads):
    """Loss over chunks of rows; when `grads` is (grad_hidden, grad_weight) fill them too."""
    dtype = _compute_dtype(hidden)
    columns = _head_columns(weight, dtype)  # (C, V)
    N, V = hidden.shape[0], weight.shape[0]
    # Where oneDNN serves this machine's fp32 products (machine.linear), each chunk's logits are its
    # fresh result, at most 32 MiB, which malloc then serves from memory the last chunk freed.
    fresh_logits = dtype == torch.float32 and machine.onednn_serves(hidden[:chunk_rows], columns.t())
    if fresh_logits:
        chunk_rows = max(1, min(chunk_rows, ONEDNN_LOGITS_ELEMENTS // V))
    grad_hidden, grad_weight = grads if grads is not None else (None, None)
    count = (targets != ignore_index).sum().clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = min(chunk_rows, N)
    # Under mixed precision the d-logits of several chunks wait for one weight-gradient product; in fp32
    # each chunk's is added at once.
    deferred = grad_weight is not None and grad_weight.dtype != dtype
    stored_rows = min(N, max(rows, LOSS_STORED_GRAD_ELEMENTS // V // rows * rows)) if deferred else rows
    d_logits = None if fresh_logits else _loss_buffer("d_logits", (stored_rows, V), dtype, hidden.device)
    scaled_hidden = hidden.new_empty((stored_rows, hidden.shape[1]), dtype=dtype) if grad_weight is not None else None
    block_rows = min(rows, LOGPROB_BLOCK_ROWS)
    low_precision = dtype.itemsize < 4  # bf16, fp16: the softmax goes through fp32 blocks
    fp32_block = _loss_buffer("fp32", (block_rows, V), torch.float32, hidden.device) if low_precision else None
    stored, first_product = 0, True
    for start in range(0, N, chunk_rows):
        h = hidden[start : start + chunk_rows].to(dtype)  # (n, C)
        n = h.shape[0]
        t = targets[start : start + chunk_rows]
        keep = t != ignore_index
        safe_t = t.clamp(min=0)[:, None]
        if stored + n > stored_rows:
            _add_weight_gradient(grad_weight, d_logits[:stored], scaled_hidden[:stored], first_product)
            stored, first_product = 0, False
        if fresh_logits:
            chunk = machine.linear(h, columns.t())  # (n, V) logits
        else:
            chunk = torch.mm(h, columns, out=d_logits[stored : stored + n])
        # The softmax and the loss in fp32 whatever the matmul's dtype: in place, or for low-precision
        # logits a few rows at a time in an fp32 block that stays in the core's cache (converting into an
        # fp32 buffer first is 3x faster on a CPU than log_softmax's own dtype argument).
        if fp32_block is None:
            _normalize_in_place(torch.log_softmax, chunk)
            target_logprobs = chunk.gather(1, safe_t).squeeze(1)
        else:
            target_logprobs = _target_logprobs(chunk, safe_t, fp32_block, write_softmax=grads is not None)
        loss_sum -= (target_logprobs * keep).sum()
        if grads is None:
            continue
        # d loss / d logits = (softmax - one-hot) * keep / count; the scale goes on the (n, C) sides
        # of the products instead of the (n, V) matrix, and the target's entry is p - 1 computed in
        # fp32 (in bf16, p - 1 is 0 whenever p > 0.996). Low-precision chunks hold the softmax already.
        if fp32_block is None:
            chunk.exp_()
        # (index_put_, not scatter_: on a CPU scatter_ walks the whole (n, V) matrix, 20 ms a chunk)
        chunk.index_put_((torch.arange(n, device=chunk.device), safe_t[:, 0]), (target_logprobs.exp() - 1).to(dtype))
        scale = (keep.float() / count)[:, None]
        if grad_hidden is not None:
            torch.mul(machine.linear(chunk, columns), scale, out=grad_hidden[start : start + n])  # chunk @ W
        if grad_weight is not None:
            torch.mul(h, scale, out=scaled_hidden[stored : stored + n])
            if deferred:
                stored += n
            else:
                _add_weight_gradient(grad_weight, chunk, scaled_hidden[:n], first_product)
                first_product = False
    if grad_weight is not None and stored:
        _add_weight_gradient(grad_weight, d_logits[:stored], scaled_hidden[:stored], first_product)
    elif grad_weight is not None and first_product:  # no rows at all
        grad_weight.zero_()
    return loss_sum / count, grads


# Rows of the head transposed at a time into its low-precision (C, V) copy: a block's 1.5 MiB of fp32
# stays in the core's cache, where one transposing copy of the whole head strides through memory.
TRANSPOSE_BLOCK_ROWS = 1024


def _head_columns(weight, dtype):
    """The head (V, C) as a (C, V) matrix in the compute dtype: a view when it is already in that dtype,
    else a copy. On a CPU the copy is stored (C, V), because oneDNN's bf16 product of the logits is about
    1.7x faster with its second operand stored that way (15 against 25 ms a chunk for bpe-mini); the copy
    is made in blocks of rows, 19 ms against 60-90 ms for one transposing copy (docs/benchmarks.md)."""
    if weight.dtype == dtype:
        return weight.t()
    if weight.device.type != "cpu" or torch.compiler.is_compiling():  # GPUs' products do not care
        return weight.to(dtype).t()
    V, C = weight.shape
    columns = _loss_buffer("weight", (C, V), dtype, weight.device)
    for start in range(0, V, TRANSPOSE_BLOCK_ROWS):
        columns[:, start : start + TRANSPOSE_BLOCK_ROWS].copy_(weight[start : start + TRANSPOSE_BLOCK_ROWS].t())
    return columns


def _normalize_in_place(function, rows) -> None:
    """`function` (softmax or log_softmax) of each row, written over the rows. CPU kernels read a row
    before they write it (tested against the out-of-place result); elsewhere a temporary is used, which
    the CUDA caching allocator makes cheap, rather than rely on an aliasing out= no GPU here has tested."""
    if rows.device.type == "cpu":
        function(rows, dim=-1, out=rows)
    else:
        rows.copy_(function(rows, dim=-1))


def _target_logprobs(logits, safe_targets, fp32_block, write_softmax: bool = False):
    """The fp32 log-probability of each row's target, from low-precision logits (n, V), converted and
    normalised `fp32_block`'s rows at a time: 13 -> 9 ms for 333 rows of 50,257 on a CPU (docs/benchmarks.md).
    With `write_softmax`, `logits` is overwritten by its softmax, each block's softmax written back while
    the block is still in the cache; the log-probability is then the log of the target's fp32 softmax,
    one exp an entry instead of two (log_softmax, then exp): 24.4 -> 22.3 ms a chunk."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    step = fp32_block.shape[0]
    for start in range(0, logits.shape[0], step):
        rows, targets = logits[start : start + step], safe_targets[start : start + step]
        block = fp32_block[: rows.shape[0]].copy_(rows)
        if write_softmax:
            _normalize_in_place(torch.softmax, block)
            target_probs = block.gather(1, targets).squeeze(1)
            if not bool((target_probs < SOFTMAX_LOG_FLOOR).any()):
                out[start : start + step] = target_probs.log()
                rows.copy_(block)
                continue
            block.copy_(rows)  # a target far below fp32's precision: its log from log_softmax
        _normalize_in_place(torch.log_softmax, block)
        out[start : start + step] = block.gather(1, targets).squeeze(1)
        if write_softmax:
            rows.copy_(block.exp_())
    return out


# Below this an fp32 softmax entry has lost relative precision (subnormal below 1.2e-38) or is 0, and its
# log would be inexact or -inf: such a block's log-probabilities come from log_softmax instead.
SOFTMAX_LOG_FLOOR = 1e-30


def _add_weight_gradient(grad_weight, d_logits, scaled_hidden, first: bool) -> None:
    """grad_weight (V, C) += d_logits.T @ scaled_hidden; the first product overwrites (no zero fill)."""
    if d_logits.dtype == grad_weight.dtype:  # accumulate inside the matmul: no (V, C) temporary
        grad_weight.addmm_(d_logits.t(), scaled_hidden, beta=0 if first else 1)
    else:  # the low-precision product into a kept buffer (no fresh pages), then converted once
        shape = tuple(grad_weight.shape)
        product = torch.mm(
            d_logits.t(), scaled_hidden, out=_loss_buffer("product", shape, d_logits.dtype, d_logits.device)
        )
        if first:
            grad_weight.copy_(product)
        else:
            grad_weight.add_(product)


class _LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss with its gradients computed in the forward pass; backward only scales them.

    The gradients are held on ctx rather than saved for backward, so that backward can hand them to
    autograd as the only reference: autograd then adds the tied embedding's gradient into the head's
    in place, and a step faults in no fresh (V, C) pages for it (docs/benchmarks.md). Hence backward
    runs once per forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, tied=None):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = _head_gradient(weight) if ctx.needs_input_grad[1] else None
        loss, _ = _chunked_loss(hidden, weight, targets, ignore_index, chunk_rows, (grad_hidden, grad_weight))
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.tied = weight.dtype, tied
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise GptlabError(
                "the chunked loss's backward ran twice on one forward; run the forward again instead of "
                "retain_graph=True"
            )
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        # The training loop's loss is not scaled (grad_output 1): then no pass over the (V, C) gradient.
        # On a GPU the check would wait for the device (and under torch.compile break the graph), so
        # there it always multiplies.
        always = grad_output.device.type != "cpu" or torch.compiler.is_compiling()
        scale = always or bool(grad_output != 1)
        if grad_hidden is not None and scale:
            grad_hidden.mul_(grad_output)
        if grad_weight is not None:
            if scale:
                grad_weight.mul_(grad_output)
            grad_weight = grad_weight.to(ctx.weight_dtype)
            if ctx.tied is not None:  # the token embedding's backward adds its rows and hands it on
                ctx.tied.hand_over(grad_weight)
                grad_weight = None
        return grad_hidden, grad_weight, None, None, None, None


def padding_causal_mask(key_mask, T: int, past: int):
    """Boolean mask (B, 1, T, S): query i sees key j when j <= past + i and key j is not padding.

    Every query also sees itself, so a padding query never has an all-masked row (SDPA would give NaN).
    """
    S = key_mask.shape[1]
    query_pos = torch.arange(past, past + T, device=key_mask.device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    causal = key_pos <= query_pos  # (T, S)
    return ((causal & key_mask[:, None, :]) | (key_pos == query_pos))[:, None]  # (B, 1, T, S)


class KVCache:
    """Preallocated keys and values of every layer, filled by a prefill and then one position per step.

    Tracks which cached positions are padding and the next position id of each row, so batches of
    prompts of different lengths decode together.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_length: int | None = None, device=None, dtype=None,
        max_rows: int | None = None,
    ):  # fmt: skip
        max_length = max_length or config.context_length
        if max_length > config.context_length:
            raise GptlabError(f"KV cache length {max_length} exceeds the context length {config.context_length}")
        self.max_rows = max_rows  # the most rows it is expected to hold: a bound on how far joins grow it
        shape = (config.n_layer, batch_size, config.n_head, max_length, config.head_dim)
        self._slots = (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self._use_rows(batch_size)
        self.key_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = max_length
        self.length = 0
        self.has_padding = False

    def _use_rows(self, rows: int) -> None:
        """Make the first `rows` rows of the allocated ones the cache's rows."""
        # Each layer's views made once: `narrow` on them is cheaper per step than indexing with a tuple.
        # (Not `unbind`, and not under no_grad: such views may not be written in place when the cache is
        # used with gradients.)
        with torch.enable_grad():
            keys, values = self.keys, self.values = tuple(slots[:, :rows] for slots in self._slots)
            self.layer_keys = [keys[layer] for layer in range(keys.shape[0])]
            self.layer_values = [values[layer] for layer in range(values.shape[0])]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """Rows allocated: rows that join fill them without copying the rows already there."""
        return self._slots[0].shape[1]

    def join(self, other: KVCache) -> None:
        """Put the rows of `other` (new rows, prefilled apart) after this cache's rows, for decoding on
        together: both are right-aligned at the longer of the two lengths, the slots before each row's
        positions become padding (masked out), and each row keeps counting its own positions.

        Only the new rows are copied, into rows allocated beforehand (when too few are, the allocation
        doubles, up to `max_rows`), and this cache's rows move only to shift right when `other` is longer:
        putting the rows together anew was 3.6-11.4 ms for bpe-mini (docs/benchmarks.md)."""
        length = max(self.length, other.length)
        if length > self.max_length:
            raise GptlabError(f"KV cache is full: {length} positions to join, {self.max_length} allocated")
        rows, new = self.batch_size, other.batch_size
        if rows + new > self.capacity:
            self._grow(rows + new)
        self._shift_right(length - self.length)
        shift = length - other.length
        for slots, theirs in zip(self._slots, (other.keys, other.values), strict=True):
            slots[:, rows : rows + new, :, :shift] = 0  # padding, but never stale numbers (0 x inf is NaN)
            slots[:, rows : rows + new, :, shift:length] = theirs[:, :, :, : other.length]
        key_mask = torch.ones(new, self.max_length, dtype=torch.bool, device=self.key_mask.device)
        key_mask[:, :shift] = False
        key_mask[:, shift:length] = other.key_mask[:, : other.length]
        self.key_mask = torch.cat([self.key_mask, key_mask])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self._use_rows(rows + new)
        self.has_padding = not bool(self.key_mask[:, :length].all())

    def _grow(self, rows: int) -> None:
        """Allocate room for at least `rows` rows (twice the rows allocated, bounded by `max_rows`), the
        cache's rows copied over."""
        capacity = max(rows, min(2 * self.capacity, self.max_rows or rows))
        grown = []
        for slots in self._slots:
            bigger = slots.new_zeros(slots.shape[:1] + (capacity,) + slots.shape[2:])
            bigger[:, : self.batch_size, :, : self.length] = slots[:, : self.batch_size, :, : self.length]
            grown.append(bigger)
        self._slots = tuple(grown)
        self._use_rows(self.batch_size)

    def _shift_right(self, shift: int) -> None:
        """Move the cache's positions `shift` slots later, the slots before them becoming padding."""
        if shift == 0:
            return
        self._move_positions(0, shift)
        for cached in (self.keys, self.values):
            cached[:, :, :, :shift] = 0
        self.key_mask[:, :shift] = False
        self.length += shift

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices, in this order): rows that ended leave the batch. Rows listed in
        increasing order move down in place, only the ones after a leaver, and only their filled slots."""
        kept = rows.tolist()
        if all(a < b for a, b in zip(kept, kept[1:], strict=False)):
            for slots in self._slots:
                for row, source in enumerate(kept):
                    if row != source:
                        slots[:, row, :, : self.length] = slots[:, source, :, : self.length]
        else:
            if len(kept) > self.capacity:  # rows repeated
                self._grow(len(kept))
            for slots in self._slots:
                slots[:, : len(kept)] = slots[:, : self.batch_size].index_select(1, rows)
        self._use_rows(len(kept))
        self.key_mask = self.key_mask.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        self.has_padding = not bool(self.key_mask[:, : self.length].all())

    def compact(self) -> None:
        """Drop the leading slots that are padding in every row, which frees as many at the end (rows that
        joined later, or left-padded ones that left, leave such slots); nothing when there are none."""
        if not self.length or not self.batch_size:
            return
        first_real = self.key_mask[:, : self.length].int().argmax(dim=1)  # (B,) each row's first real slot
        drop = int(first_real.min())
        if drop == 0:
            return
        self._move_positions(drop, 0)
        self.length -= drop
        self.key_mask[:, self.length :] = True
        self.has_padding = not bool(self.key_mask[:, : self.length].all())

    def _move_positions(self, start: int, to: int) -> None:
        """Move every row's slots from `start` to the cache's length so that they begin at `to` (keys,
        values and the padding mask; through a copy, as the two ranges overlap)."""
        end = to + self.length - start
        for cached in (self.keys, self.values):
            cached[:, :, :, to:end] = cached[:, :, :, start : self.length].clone()
        self.key_mask[:, to:end] = self.key_mask[:, start : self.length].clone()

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        self.key_mask.fill_(True)
        self.next_position.zero_()

    def prepare(self, T: int, attention_mask, positions, position_ids):
        """Record the new positions' padding; return (positions, attention mask, causal flag) for them."""
        start, end = self.length, self.length + T
        if end > self.max_length:
            raise GptlabError(f"KV cache is full: {end} positions requested, {self.max_length} allocated")
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            self.key_mask[:, start:end] = attention_mask
            self.has_padding = self.has_padding or not bool(attention_mask.all())
        if positions is None:
            if attention_mask is None and not self.has_padding:
                positions = position_ids[start:end]
            else:
                real = attention_mask if attention_mask is not None else torch.ones_like(self.key_mask[:, :T])
                positions = self.next_position[:, None] + (real.long().cumsum(1) - 1).clamp(min=0)
        step_real = T if attention_mask is None else attention_mask.long().sum(1)
        self.next_position += step_real
        if not self.has_padding:
            # Plain causal attention: a single new position sees everything cached, a longer chunk
            # after a non-empty cache needs an offset mask (SDPA's is_causal aligns top-left).
            if T == 1 or start == 0:
                return positions, None, start == 0
        return positions, padding_causal_mask(self.key_mask[:, :end], T, start), False

    def update(self, layer: int, k, v):
        """Store new keys/values (B, H, T, D) of one layer; return all cached ones (B, H, S, D)."""
        start, end = self.length, self.length + k.shape[2]
        keys, values = self.layer_keys[layer], self.layer_values[layer]
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, T: int) -> None:
        self.length += T


class DecodeStep:
    """One new position per row through a plain GPT with a KV cache: the blocks' operations in the same
    order, so the same numbers (tested bit for bit), without the module calls and on (B, C) rows instead
    of (B, 1, C) ones. On a CPU a small model's decoding step is mostly such per-call work: 0.63 -> 0.33 ms
    a token for 6 layers 48 wide (docs/benchmarks.md).

    It restates `Block`'s arithmetic, so a change there must be made here too (the bit-for-bit test
    fails otherwise). Each layer's tensors are looked up when the step is made, once per generation:
    in-place updates of the parameters are seen, parameters replaced by new tensors are not.

    `columns`: for each block, its four projections' weights W stored as W^T's columns in k groups,
    (k, in, n), which steps of one row (and of several with `rows_too`) multiply instead of W
    (`_project`). Some CPUs stream a vector times such columns up to 2x faster, a group a thread
    (docs/benchmarks.md; `generate.block_columns` measures it and makes the copies); the sums then run
    in another order, so those steps match the modules to fp32's rounding, not bit for bit. The copies
    are the weights as they were when the step was made: the caller makes the step again after
    changing them (decoding makes one per generation).
    """

    def __init__(self, model: GPT, columns: Sequence[Sequence[torch.Tensor]] | None = None, rows_too: bool = False):
        self.model = model
        self.n_head, self.head_dim = model.config.n_head, model.config.head_dim
        self.layers = [self._layer(block) for block in model.blocks]
        self.column_layers = None  # the layers with `columns`, for one row, and for more if `rows_too`
        if columns is not None:
            self.column_layers = [self._layer(b, c) for b, c in zip(model.blocks, columns, strict=True)]
        self.rows_too = rows_too
        self.ln_f = _norm_args(model.ln_f)

    @staticmethod
    def _layer(block: Block, columns: Sequence[torch.Tensor] = (None,) * 4) -> tuple:
        """A block's norms' arguments and its projections' (weight, bias, columns or None); with columns
        (k, in, n), the bias as (k, 1, n), as `_project` adds it (`_grouped`)."""
        linears = (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj)
        qkv, attn_proj, fc, mlp_proj = (
            (linear.weight, _grouped(linear.bias, column), column)
            for linear, column in zip(linears, columns, strict=True)
        )
        return _norm_args(block.ln_1), qkv, attn_proj, _norm_args(block.ln_2), fc, mlp_proj

    @staticmethod
    def fits(model: nn.Module) -> bool:
        """Whether the step computes what `model.hidden_states` would: a GPT whose modules are exactly
        GPT's (not LoRA adapters, not compiled or sharded ones), all in evaluation mode, none with a
        forward of its own or a hook, and no global module hooks (profilers and tracers use them)."""
        if not isinstance(model, GPT) or type(model).hidden_states is not GPT.hidden_states:
            return False
        if "hidden_states" in vars(model) or len(model.blocks) != model.config.n_layer:
            return False
        kinds = [(model.token_embedding, nn.Embedding), (model.position_embedding, nn.Embedding)]
        kinds.append((model.ln_f, nn.LayerNorm))
        for block in model.blocks:
            kinds += [(block, Block), (block.attn, CausalSelfAttention), (block.mlp, MLP)]
            kinds += [(block.ln_1, nn.LayerNorm), (block.ln_2, nn.LayerNorm)]
        linears = [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]
        if any(type(module) is not kind or "forward" in vars(module) for module, kind in kinds):
            return False
        if any(not plain_linear(linear) or "forward" in vars(linear) for linear in linears):
            return False
        return not any(m.training or _hooked(m) for m in model.modules())

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The final normalised hidden state (B, C) after `tokens` (B,), one new position per row."""
        model = self.model
        B, H, D = tokens.shape[0], self.n_head, self.head_dim
        positions, mask, causal = cache.prepare(1, None, None, model.position_ids)
        x = F.embedding(tokens, model.token_embedding.weight) + F.embedding(
            positions.reshape(-1), model.position_embedding.weight
        )  # (B, C)
        by_columns = self.column_layers is not None and (B == 1 or self.rows_too)
        layers = self.column_layers if by_columns else self.layers
        for layer, (ln_1, qkv, attn_proj, ln_2, fc, mlp_proj) in enumerate(layers):
            q, k, v = _project(F.layer_norm(x, *ln_1), *qkv).reshape(B, 3, H, 1, D).unbind(1)  # 3 x (B, H, 1, D)
            keys, values = cache.update(layer, k, v)  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)  # (B, H, 1, D)
            x = x + _project(y.reshape(B, H * D), *attn_proj)
            x = x + _project(F.gelu(_project(F.layer_norm(x, *ln_2), *fc), approximate="tanh"), *mlp_proj)
        cache.advance(1)
        return F.layer_norm(x, *self.ln_f)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor | None):
    """A linear layer of rows x (B, C_in): `F.linear` with the (out, in) weight; or x times `columns`, the
    weight's transpose in k groups of n columns (k, in, n; `generate._columns`, the last padded), each
    group's product a batch entry of `bmm`, which gives each its own thread, with the bias as (k, 1, n).
    For one row the groups' results (k, 1, n) lie in memory as the row they make."""
    if columns is None:
        return F.linear(x, weight, bias)
    if len(columns) == 1:  # a plain product: `bmm` of one batch entry is slower (2.5-3.1 against 1.8-2.2 ms)
        return x @ columns[0] if bias is None else torch.addmm(bias[0], x, columns[0])
    rows = x[None].expand(len(columns), *x.shape)
    out = torch.bmm(rows, columns) if bias is None else torch.baddbmm(bias, rows, columns)  # (k, B, n)
    out = out.view(1, -1) if len(x) == 1 else out.transpose(0, 1).reshape(len(x), -1)
    return out[:, : weight.shape[0]]


def _grouped(bias: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as `_project` adds it: as it is for `F.linear`, (k, 1, n) for k groups of n columns."""
    if bias is None or columns is None:
        return bias
    groups, _, n = columns.shape
    if groups * n != len(bias):
        bias = torch.cat([bias, bias.new_zeros(groups * n - len(bias))])
    return bias.view(groups, 1, n)


def _norm_args(norm: nn.LayerNorm) -> tuple:
    """A LayerNorm module's arguments to F.layer_norm after the input."""
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps
