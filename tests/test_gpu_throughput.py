"""The GPU benchmark script runs (as a tiny CPU smoke run here) and reports what it promises."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def test_gpu_throughput_script_reports_tokens_per_second_mfu_and_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        ["--tiny", "--steps", "2", "--warmup", "1", "--activation-checkpointing", "--out", str(tmp_path / "r.json")]
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "tiny (CPU smoke run)" and result["activation_checkpointing"]
    assert result["tokens_per_second"] > 0 and 0 < result["mfu"] < 1 and result["peak_rss_mib"] > 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "MFU" in printed and "memory" in printed
