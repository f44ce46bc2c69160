"""The machine: its CPU, allocator and kept measurements, and the kernel of fp32 linear layers."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab import machine
from gptlab.config import GPTConfig
from gptlab.model import GPT


def _glibc() -> bool:
    import ctypes
    import sys

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def _page_faults_of_a_step_of_activations() -> int:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(3 * 2**18) for _ in range(40)]  # 40 x 3 MiB, made (every page written) then freed
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc settings: Linux with glibc only")
def test_configure_allocator_keeps_the_memory_a_step_frees_for_the_next():
    """Without the settings glibc gives the 120 MiB back to the kernel after each round and the next round
    faults its 30,720 pages in again (each zero-filled by the kernel); with them the pages stay."""
    from gptlab.machine import configure_allocator

    assert configure_allocator()
    # The first rounds grow the heap and fit blocks around what earlier tests left (here 30,721, 4,608,
    # 768 pages); then no page is new.
    rounds = [_page_faults_of_a_step_of_activations() for _ in range(6)]
    assert rounds[-1] < 1000, rounds


def test_remembered_measures_once_and_survives_a_cache_it_cannot_write(tmp_path, monkeypatch):
    from gptlab.machine import remembered

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    calls = []

    def measure():
        calls.append(1)
        return 2.5

    def positive(value):
        return isinstance(value, float) and value > 0

    assert remembered("speeds.json", "key", measure, positive) == 2.5
    assert remembered("speeds.json", "key", measure, positive) == 2.5 and len(calls) == 1
    assert remembered("speeds.json", "other", measure, positive) == 2.5 and len(calls) == 2
    (tmp_path / "cache" / "speeds.json").write_text('{"key": -1.0, "other": 2.5}')  # not valid: measured again
    assert remembered("speeds.json", "key", measure, positive) == 2.5 and len(calls) == 3
    (tmp_path / "cache" / "speeds.json").write_text("[not, json")
    assert remembered("speeds.json", "other", measure, positive) == 2.5 and len(calls) == 4
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "blocked"))
    assert remembered("speeds.json", "key", measure, positive) == 2.5 and len(calls) == 5


def test_machine_key_names_the_cpu_its_threads_and_torch():
    from gptlab.machine import cpu_name, machine_key

    key = machine_key(torch.device("cpu"))
    assert cpu_name() in key and f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    if Path("/proc/cpuinfo").is_file():
        assert cpu_name().endswith(")") and "/" in cpu_name()  # "AMD EPYC (25/17)": family and model


def _gradients(function, x, weight, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    out = function(*leaves[:2], leaves[2] if bias is not None else None)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [56, 24])  # the weight's gradient copies x, or d_y, transposed
@pytest.mark.parametrize("shape", [(24, 40), (3, 8, 40), "transposed"])
def test_onednn_linear_gives_f_linear_and_its_gradients(onednn, shape, out_features, bias):
    x = torch.randn(8, 3, 40).transpose(0, 1) if shape == "transposed" else torch.randn(shape)
    weight, b = torch.randn(out_features, 40), torch.randn(out_features) if bias else None
    ours = _gradients(machine.linear, x, weight, b)
    assert onednn, "oneDNN did not serve"
    for got, expected in zip(ours, _gradients(F.linear, x, weight, b), strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_onednn_linear_takes_only_the_gradients_asked_for(onednn, monkeypatch):
    products = []
    for name in ("_onednn_input_grad", "_onednn_weight_grad"):
        product = getattr(machine, name)
        monkeypatch.setattr(machine, name, lambda *args, n=name, p=product: products.append(n) or p(*args))
    x, weight = torch.randn(16, 32), torch.randn(24, 32, requires_grad=True)
    machine.linear(x, weight).sum().backward()  # x needs no gradient: only the weight's product runs
    torch.testing.assert_close(weight.grad, torch.ones(16, 24).t() @ x)
    assert products == ["_onednn_weight_grad"]
    x.requires_grad_()
    weight.requires_grad_(False)
    machine.linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(16, 24) @ weight)
    assert products == ["_onednn_weight_grad", "_onednn_input_grad"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's forward_ad internals
def test_forward_mode_derivatives_take_f_linear(onednn):
    import torch.autograd.forward_ad as fwAD

    x, weight, bias = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
    tangents = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
    results = []
    for function in (machine.linear, F.linear):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip((x, weight, bias), tangents, strict=True)]
            results.append(fwAD.unpack_dual(function(*duals)).tangent)
    torch.testing.assert_close(results[0], results[1])
    assert not onednn  # dual tensors take torch's own layer


def test_what_onednn_cannot_read_goes_to_f_linear(onednn):
    """Biases it would read as a plain vector (strided, broadcast), empty inputs and wrong shapes are
    F.linear's: its results and its error messages."""
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    for bias in (torch.randn(12)[::2], torch.randn(1).expand(6), torch.randn(()), torch.randn(1)):
        torch.testing.assert_close(machine.linear(x, weight, bias), F.linear(x, weight, bias))
    assert machine.linear(torch.randn(0, 8), weight).shape == (0, 6)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        machine.linear(torch.randn(5, 7), weight)
    assert not onednn
    torch.backends.mkldnn.enabled = False  # the user's switch for oneDNN
    try:
        machine.linear(x, weight)
    finally:
        torch.backends.mkldnn.enabled = True
    assert not onednn
    machine.linear(x, weight, torch.randn(6))
    assert len(onednn) == 1


def test_onednn_linear_has_second_derivatives(onednn):
    x, weight = torch.randn(6, 10), torch.randn(4, 10)

    def grad_of_grad(function):
        w = weight.clone().requires_grad_()
        (first,) = torch.autograd.grad(function(x, w).pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad(first.pow(2).sum(), w)[0]

    torch.testing.assert_close(grad_of_grad(machine.linear), grad_of_grad(F.linear), rtol=1e-4, atol=1e-5)
    assert onednn


def test_f_linear_serves_what_onednn_should_not(monkeypatch, onednn):
    weight = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's products are oneDNN's own bf16 ones
        assert machine.linear(torch.randn(4, 8), weight).dtype == torch.bfloat16
    machine.linear(torch.randn(4, 8, dtype=torch.float64), weight.double())
    machine.linear(torch.randn(4, 8).bfloat16(), weight.bfloat16())
    assert not onednn
    monkeypatch.setattr(machine, "ONEDNN_MIN_MACS", 4 * 8 * 8 + 1)  # the product is too small for its fixed cost
    machine.linear(torch.randn(4, 8), weight)
    assert not onednn
    monkeypatch.setattr(machine, "onednn_pays", lambda: False)  # the machine measured MKL faster
    monkeypatch.setattr(machine, "ONEDNN_MIN_MACS", 0)
    machine.linear(torch.randn(4, 8), weight)
    assert not onednn


def test_a_gpt_trains_the_same_through_onednn(onednn, monkeypatch):
    config = GPTConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    idx = torch.randint(0, 50, (3, 16))

    def step(through_onednn):
        monkeypatch.setattr(machine, "onednn_pays", lambda: through_onednn)
        torch.manual_seed(0)
        model = GPT(config)
        loss = model(idx, idx)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    (expected, grads), (ours, our_grads) = step(False), step(True)
    assert len(onednn) == 2 * 4 + 1  # every block's four linear layers and the head
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_kernel_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "_onednn_choice", {})
    monkeypatch.setattr(machine, "_choice_for_graphs", [False])
    calls = []
    measure = machine._measure_kernels
    monkeypatch.setattr(machine, "_measure_kernels", lambda: calls.append(1) or measure())
    first = machine.onednn_pays()
    assert machine.onednn_pays() == first and len(calls) == 1
    (entry,) = json.loads((tmp_path / "kernels.json").read_text()).values()
    assert entry["onednn"] == first
    if machine._onednn_available():  # the times, for people to read
        assert entry["mkl_s"] > 0 and entry["onednn_s"] > 0
        assert first == (entry["onednn_s"] < machine.ONEDNN_PAYS_BELOW * entry["mkl_s"])
    monkeypatch.setattr(machine, "_onednn_choice", {})  # a new process reads the file
    assert machine.onednn_pays() == first and len(calls) == 1


def test_onednn_that_disagrees_with_mkl_is_not_taken(monkeypatch):
    if not machine._onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(machine, "_onednn_input_grad", lambda rows, weight: (rows @ weight) * 1.01)
    assert machine._measure_kernels() == {"onednn": False, "reason": "oneDNN's fp32 products disagree with MKL's"}
    monkeypatch.setattr(machine, "_onednn_available", lambda: False)
    assert machine._measure_kernels()["onednn"] is False


def test_compiled_graphs_keep_the_onednn_linear_and_its_gradients(onednn, monkeypatch):
    """torch.compile traces the layer (its products are an operator of their own, with shapes for the
    compiler), taking the choice the process made before compiling: it measures nothing in a graph."""
    import torch._dynamo
    from torch.profiler import profile

    monkeypatch.setattr(machine, "_choice_for_graphs", [True])
    x, weight, bias = torch.randn(2, 6, 40), torch.randn(24, 40), torch.randn(24)
    function = torch.compile(machine.linear, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        _gradients(function, x, weight, bias)  # compiled here
        with profile() as run:
            ours = _gradients(function, x, weight, bias)
    finally:
        torch._dynamo.reset()
    # the forward and both gradients, at run time
    assert sum(event.count for event in run.key_averages() if event.key == "gptlab::onednn_linear") == 3
    for got, expected in zip(ours, _gradients(F.linear, x, weight, bias), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mfu_s_base_is_the_faster_fp32_kernel(monkeypatch):
    if not machine._onednn_available():
        pytest.skip("this torch has no oneDNN")
    calls = []
    forward = machine._onednn_forward
    monkeypatch.setattr(machine, "_onednn_forward", lambda *args: calls.append(1) or forward(*args))
    assert machine._matmul_flops(torch.device("cpu"), torch.float32) > 0 and calls  # both kernels timed
    calls.clear()
    machine._matmul_flops(torch.device("cpu"), torch.bfloat16)
    assert not calls  # bf16 products are torch's (oneDNN's own under the hood)


def test_fastest_picks_the_candidate_with_the_shortest_median_time():
    import time

    calls = []
    name, medians = machine.fastest({"slow": lambda: time.sleep(0.004), "fast": lambda: calls.append(1)}, repeats=3)
    assert name == "fast" and len(calls) == 4  # one warm-up, then the repeats
    assert medians["slow"] >= 0.004 > medians["fast"]
