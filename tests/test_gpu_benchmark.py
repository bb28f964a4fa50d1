"""benchmarks/gpu.py on the CPU: every row's code path runs (tiny sizes), CUDA-only rows skip
with their reason, a failing row loses no other, the budget and --resume hold."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from forkpop.population.lm import LMConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--quick", "--mlp-sizes", "4", "--lm-sizes", "2", "--steps", "9"]
TINY += ["--lm-steps", "1", "--lm-batch", "1", "--repeats", "1", "--gemm-n", "64"]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("forkpop_gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in json.loads(path.read_text())["rows"]}


def test_cpu_run_covers_every_row(gpu, tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("membw went wrong")

    monkeypatch.setattr(gpu, "bench_membw", broken)  # one failing row must not lose the others
    # A small transformer: bf16 on a CPU is slow (~0.6 s a step for the default LMConfig).
    monkeypatch.setattr(gpu, "LM_CFG", LMConfig(n_layer=1, n_head=2, d_model=16, context=8))
    out = tmp_path / "g.json"
    assert gpu.main([*TINY, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["key"]: r for r in doc["rows"]}
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["mlp_flop_per_sample"] == 6 * (64 * 128 + 128 * 10)
    membw = rows["membw/copy/fp32/16"]
    assert membw["status"] == "error" and "membw went wrong" in membw["reason"]
    assert not [k for k, r in rows.items() if r["status"] not in ("ok", "skipped") and r["part"] != "membw"]
    for key in ("mlp/learner/fp32/4", "mlp/bmm/fp32/4", "mlp/bmm/bf16/4"):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["samples_per_s"] > 0 and r["flops_per_s"] == pytest.approx(r["samples_per_s"] * 56832)
        assert "ratio_to_gemm" in r
    assert rows["mlp/learner/fp32/4"]["diverged"] == 0 and rows["mlp/learner/fp32/4"]["engine_samples_per_s"] > 0
    assert rows["mlp/bmm/fp32/4"]["finite"]
    for prec in ("fp32", "bf16"):
        r = rows[f"lm/population/{prec}/2"]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
    assert rows["gemm/gemm_peak/fp32/64"]["flops_per_s"] > 0 and rows["gemm/gemm_peak/bf16/64"]["status"] == "ok"
    # The CUDA-only rows are there, skipped, with the reason.
    for key in ("mlp/bmm_graph/fp32/4", "mlp/bmm_graph10/fp32/4", "mlp/bmm_compile/fp32/4"):
        assert rows[key]["status"] == "skipped" and "CUDA" in rows[key]["reason"], rows[key]
    assert rows["gemm/gemm_peak/tf32/64"]["status"] == "skipped" and "TF32" in rows["gemm/gemm_peak/tf32/64"]["reason"]
    assert rows["mlp/bmm_compile/tf32/4"]["status"] == "skipped"
    printed = capsys.readouterr().out
    assert "| part | engine |" in printed and "mlp | learner | fp32 | 4 |" in printed


def test_budget_and_resume(gpu, tmp_path):
    out = tmp_path / "g.json"
    assert gpu.main([*TINY, "--json", str(out), "--budget-s", "0", "--only", "gemm,lm"]) == 0
    rows = _rows(out)
    assert rows and all(r["status"] == "skipped" and r["reason"].startswith("budget") for r in rows.values())
    # A row a dead process left running becomes crashed and is not retried; the others run.
    doc = json.loads(out.read_text())
    doc["rows"] = [{**doc["rows"][0], "status": "running"}]  # gemm/gemm_peak/fp32/64
    out.write_text(json.dumps(doc))
    assert gpu.main([*TINY, "--json", str(out), "--only", "gemm", "--resume"]) == 0
    rows = _rows(out)
    assert rows["gemm/gemm_peak/fp32/64"]["status"] == "crashed"
    assert rows["gemm/gemm_peak/bf16/64"]["status"] == "ok"
    assert json.loads(out.read_text())["meta"]["resumed"] == 1


def test_no_cuda_is_a_clear_line(gpu, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    assert gpu.main(["--device", "cuda", "--json", str(out)]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().out
    assert "sees no CUDA GPU" in json.loads(out.read_text())["meta"]["error"]
