"""What this machine is and what it runs fastest.

The CPU's features (bf16 units), its threads and memory allocator, speeds measured once per machine and
kept in the cache (`remembered`), and the kernel for fp32 linear layers on a CPU: torch multiplies fp32
matrices through MKL, which runs AVX2 code on AMD processors; oneDNN, which torch carries too, runs
AVX-512 there, about twice as fast. `linear` takes it wherever this machine measured it faster.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import checkpoint as ckpt


@functools.cache
def cpu_fields() -> dict[str, str]:
    """The first processor's `field: value` lines of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX-512 BF16); otherwise bf16 is emulated and slow."""
    flags = cpu_fields().get("flags", "").split()
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads slow matrix kernels down)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    fields = cpu_fields()
    try:
        siblings, cores = int(fields["siblings"]), int(fields["cpu cores"])
    except (KeyError, ValueError):
        return max(1, available)
    if siblings > cores:
        return max(1, available * cores // siblings)
    return max(1, available)


def configure_threads(threads: int = 0) -> int:
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n


# glibc's malloc hands blocks above a threshold (128 KiB, raised as such blocks are freed, up to 32 MiB)
# to the kernel one mmap each and gives freed memory at the top of its heap back beyond another. A
# training step frees its activations in backward and makes them again in the next forward: the kernel
# then zero-fills every page anew (a bpe-mini bf16 step faulted in 40-53 thousand pages, 160-210 MB,
# about 90 ms of CPU time). These keep that memory in the process: blocks up to 32 MiB (the most glibc
# takes) come from the heap, and up to 1 GiB freed at its top stays there for the next step.
MALLOC_MMAP_THRESHOLD = 32 * 2**20
MALLOC_TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def configure_allocator() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step (see above); returns
    whether it did (Linux with glibc; elsewhere the C library's defaults stay). For the whole process,
    like the thread count, and left so when training ends: a process that trained once may train again."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own: musl's mallopt does nothing
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def cpu_name() -> str:
    """This CPU's model name with its family and model numbers ("AMD EPYC (25/17)"): one home folder,
    and so one cache of measurements, may serve machines of several kinds (a cluster's nodes)."""
    import platform

    fields = cpu_fields()
    if "model name" not in fields:
        return platform.processor() or platform.machine() or "cpu"
    return f"{fields['model name']} ({fields.get('cpu family', '?')}/{fields.get('model', '?')})"


def machine_key(device: torch.device) -> str:
    """What a speed measured on `device` depends on: the device (a CPU's model and threads) and torch."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name() if device.type == 'cpu' else device.type}, {torch.get_num_threads()} threads"
    return f"{name}|torch-{torch.__version__}"


def remembered(file_name: str, key: str, measure: Callable[[], object], valid: Callable[[object], bool] = bool):
    """`measure()` for `key`, measured once and kept in the cache's `file_name` (JSON): measurements of
    this machine's speed that would cost time at every start. An entry that is not `valid` is measured
    again; a cache that cannot be written only costs the next run the measurement."""
    from gptlab.download import cache_dir

    cache_file = cache_dir() / file_name
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if key in cached and valid(cached[key]):
        return cached[key]
    cached[key] = value = measure()
    with contextlib.suppress(OSError):
        ckpt.atomic_write_text(cache_file, json.dumps(cached, indent=1))
    return value


def fastest(candidates: dict[str, Callable[[], object]], repeats: int) -> tuple[str, dict[str, float]]:
    """The candidate with the shortest median time (the times interleaved, after one warm-up each) and
    every candidate's median seconds."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for work in candidates.values():
        work()
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    return min(medians, key=medians.get), medians


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """The matrix-multiply FLOP/s this device reaches (measured once, cached), the base of MFU: on a CPU
    in fp32 the faster of torch's product (MKL) and oneDNN's, which `linear` may take."""
    dtype = dtype or torch.float32
    key = f"{machine_key(device)}|{dtype}|fastest kernel"
    return float(remembered("peak_flops.json", key, lambda: _matmul_flops(device, dtype), _positive_number))


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


def _matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    # A private generator: measuring must not move the global RNG (exact resume depends on it).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    products = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and _onednn_available():
        products.append(lambda: _onednn_forward(a, b, None))
    best = math.inf
    for _ in range(5):
        for product in products:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(4):
                product()
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op on CPUs), so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the kernel of fp32 linear layers

# Below this many multiply-adds a product is too small for oneDNN's fixed cost of a call (about 15 us
# against MKL's 5 on a Zen 5: (16, 128) x (128, 384) took 20 us against 15, (64, 128) x (128, 384) 31
# against 41), and the layer keeps MKL.
ONEDNN_MIN_MACS = 1 << 20
# oneDNN serves when the measured products take it under this share of MKL's time: a close call keeps
# torch's own kernel.
ONEDNN_PAYS_BELOW = 0.9
# The products measured, (rows, in, out): char-small's QKV layer and a bpe-mini MLP layer's, each
# forward, input gradient and weight gradient.
KERNEL_SHAPES = ((768, 128, 384), (512, 384, 1536))
_onednn_choice: dict[int, bool] = {}  # threads -> whether oneDNN serves, for this process
# The choice last made outside a compiled graph, for the graphs, which cannot measure (a cell, so that
# the compiler reads its value).
_choice_for_graphs = [False]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, with fp32 products on a CPU (and their gradients) through oneDNN
    where this machine measured it faster than torch's MKL (`onednn_pays`)."""
    if onednn_serves(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_serves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` runs on oneDNN: fp32 on a CPU, shapes `F.linear` takes without
    broadcasting a bias (oneDNN reads it as a plain vector), enough work, and this machine's choice (in a
    compiled graph, the one made before compiling)."""
    plain = (torch.Tensor, torch.nn.Parameter)  # not DTensors, fake or other subclasses
    if type(x) not in plain or type(weight) not in plain or (bias is not None and type(bias) not in plain):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        return False
    if x.numel() // x.shape[-1] * weight.numel() < ONEDNN_MIN_MACS or not torch.backends.mkldnn.enabled:
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast's bf16 products are oneDNN's already
        return False
    if torch.compiler.is_compiling():  # the choice this process made before compiling; a graph measures nothing
        return _choice_for_graphs[0]
    # torch.func's transforms and forward-mode derivatives (dual tensors) take torch's own layer.
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return False
    return onednn_pays()


def onednn_pays() -> bool:
    """Whether oneDNN's fp32 products beat MKL's on this machine at this thread count: measured once
    (`_measure_kernels`, about 0.2 s) and kept in the cache's kernels.json."""
    threads = torch.get_num_threads()
    if threads not in _onednn_choice:
        key = f"{machine_key(torch.device('cpu'))}|fp32 linear"
        choice = remembered("kernels.json", key, _measure_kernels, _valid_kernel_choice)
        _onednn_choice[threads] = choice["onednn"]
    _choice_for_graphs[0] = _onednn_choice[threads]
    return _choice_for_graphs[0]


def _valid_kernel_choice(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("onednn"), bool)


def _onednn_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@torch.library.custom_op("gptlab::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias on oneDNN: an operator of its own, which torch.compile keeps as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias on oneDNN: in a graph the operator above; eagerly oneDNN's own call, since the
    operator's way through Python costs tens of microseconds a call (char-small's eager step 27.3 ->
    25.7 ms, medians of eight alternated pairs of runs on the Zen 5)."""
    if torch.compiler.is_compiling():
        return torch.ops.gptlab.onednn_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_input_grad(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d loss / d x = d_y (M, out) @ W (out, in): W^T as the (in, out) "weight", which oneDNN reads strided."""
    return _onednn_forward(rows, weight.t(), None)


def _onednn_weight_grad(rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """d loss / d W = d_y^T (out, M) @ x (M, in). oneDNN wants its first operand contiguous and reads the
    second strided, and torch's transposing copies are slow (768 x 512 floats: 280 us against 21 for a
    plain copy on a Zen 5). So the narrower of d_y and x is the one copied transposed: d_y^T @ x, or
    (x^T @ d_y)^T for a layer wider out than in (then the (in, out) result is transposed, a smaller copy).
    Zen 5, (768, 128) -> 512: 470 -> 370 us. The copy is made here, not inside oneDNN's call, where
    torch.compile can fold it into the kernel that computes d_y (char-small's compiled step 1 ms less)."""
    if rows.shape[1] <= x_rows.shape[1]:
        return _onednn_forward(rows.t().contiguous(), x_rows.t(), None)
    return _onednn_forward(x_rows.t().contiguous(), rows.t(), None).t().contiguous()


class _OneDNNLinear(torch.autograd.Function):
    """A linear layer whose three products (forward, input and weight gradients) run on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])  # (M, out)
        x_rows = x.reshape(-1, x.shape[-1])  # (M, in)
        # Under create_graph=True the products must be differentiable themselves: torch's own.
        differentiable = torch.is_grad_enabled()
        need_input, need_weight, need_bias = ctx.needs_input_grad
        input_grad = weight_grad = bias_grad = None
        if need_input:
            input_grad = (rows @ weight if differentiable else _onednn_input_grad(rows, weight)).reshape(x.shape)
        if need_weight:
            weight_grad = rows.t() @ x_rows if differentiable else _onednn_weight_grad(rows, x_rows)
        if ctx.has_bias and need_bias:
            bias_grad = rows.sum(0)
        return input_grad, weight_grad, bias_grad


def _measure_kernels() -> dict:
    """Times of `KERNEL_SHAPES`' products through MKL (torch's own) and oneDNN (`fastest`: interleaved,
    medians of 9); oneDNN is taken only where its results agree with MKL's to fp32's precision."""
    if not _onednn_available():
        return {"onednn": False, "reason": "torch has no oneDNN here"}
    generator = torch.Generator().manual_seed(0)
    operands = [
        (torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator),
         torch.randn(m, n, generator=generator))
        for m, k, n in KERNEL_SHAPES
    ]  # fmt: skip
    kernels = {
        "mkl": lambda x, w, dy: (F.linear(x, w), dy @ w, dy.t() @ x),
        "onednn": lambda x, w, dy: (_onednn_forward(x, w, None), _onednn_input_grad(dy, w), _onednn_weight_grad(dy, x)),
    }
    try:
        for x, w, dy in operands:
            for mkl, onednn in zip(kernels["mkl"](x, w, dy), kernels["onednn"](x, w, dy), strict=True):
                if not torch.allclose(onednn, mkl, rtol=1e-4, atol=1e-4 * mkl.abs().max().item()):
                    return {"onednn": False, "reason": "oneDNN's fp32 products disagree with MKL's"}
    except RuntimeError as error:
        return {"onednn": False, "reason": f"oneDNN failed: {error}"[:200]}
    medians = fastest({name: lambda p=products: [p(*o) for o in operands] for name, products in kernels.items()}, 9)[1]
    mkl_s, onednn_s = medians["mkl"], medians["onednn"]
    return {"mkl_s": mkl_s, "onednn_s": onednn_s, "onednn": onednn_s < ONEDNN_PAYS_BELOW * mkl_s}
