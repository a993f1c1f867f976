"""The benchmark end to end on tiny settings: real training steps through the project's
loop, records with the promised fields, a markdown table, and unsupported engines
recorded with their reason instead of crashing the run."""

from __future__ import annotations

import json

import opacus
import pytest
import torch

from dp_sweeps import bench

TINY_CONVNET = ["model.width=4", "model.hidden=16"]
FIELDS = {"model", "mode", "samples_per_second", "peak_memory_mb", "device", "batch_size",
          "physical_batch_size", "steps", "repeats", "torch_version", "opacus_version", "status",
          "time_ratio_vs_none", "speedup_vs_hooks", "memory_method"}


def _run(tmp_path, *args: str) -> list[dict]:
    assert bench.main(["--out", str(tmp_path), "--device", "cpu", *args]) == 0
    return json.loads((tmp_path / "bench.json").read_text())


def test_tiny_bench_writes_records_and_table(tmp_path):
    records = _run(tmp_path, "--models", "convnet", "--modes", "none,hooks", "--steps", "2", "--repeats", "2",
                   "--batch-size", "16", "--physical-batch-size", "8", *TINY_CONVNET)
    assert [(r["model"], r["mode"]) for r in records] == [("convnet", "none"), ("convnet", "hooks")]
    none, hooks = records
    for r in records:
        assert FIELDS <= set(r)
        assert r["status"] == "ok" and r["device"] == "cpu"
        assert r["samples_per_second"] > 0 and len(r["samples_per_second_runs"]) == 2
        assert r["peak_memory_mb"] >= 0
        assert (r["batch_size"], r["physical_batch_size"], r["steps"], r["repeats"]) == (16, 8, 2, 2)
        assert r["torch_version"] == torch.__version__ and r["opacus_version"] == opacus.__version__
        assert r["overrides"] == TINY_CONVNET
    # The ratio is time per sample relative to non-private training.
    assert none["time_ratio_vs_none"] == 1.0 and none["speedup_vs_hooks"] is None
    assert hooks["time_ratio_vs_none"] == pytest.approx(none["samples_per_second"] / hooks["samples_per_second"])
    assert hooks["speedup_vs_hooks"] == pytest.approx(1.0)
    table = (tmp_path / "bench.md").read_text()
    assert "| convnet | none |" in table and "| convnet | hooks |" in table
    assert f"{hooks['time_ratio_vs_none']:.2f}" in table


def test_stock_opacus_baseline_runs_opacus_own_code_and_anchors_the_speedup(tmp_path, monkeypatch):
    from opacus.grad_sample import GradSampleModule

    from dp_sweeps.grad_sample import samplers as grad_samplers

    seen = []  # which conv sampler Opacus holds while each mode trains
    real_fit = bench.fit

    def spying_fit(**kwargs):
        seen.append(GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv2d])
        return real_fit(**kwargs)

    monkeypatch.setattr(bench, "fit", spying_fit)
    records = _run(tmp_path, "--models", "convnet", "--modes", "none,opacus_hooks,hooks", "--steps", "1",
                   "--repeats", "1", "--batch-size", "16", "--physical-batch-size", "8", *TINY_CONVNET)
    stock, ours = records[1], records[2]
    assert (stock["mode"], ours["mode"]) == ("opacus_hooks", "hooks") and stock["status"] == ours["status"] == "ok"
    # warm-up then one repeat, modes in order: none, opacus_hooks, hooks
    assert seen[1] is grad_samplers.opacus_conv_grad_sample and seen[4] is grad_samplers.opacus_conv_grad_sample
    assert seen[2] is grad_samplers.conv2d_grad_sample and seen[5] is grad_samplers.conv2d_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv2d] is grad_samplers.conv2d_grad_sample  # restored
    assert stock["speedup_vs_hooks"] == pytest.approx(1.0)
    assert ours["speedup_vs_hooks"] == pytest.approx(ours["samples_per_second"] / stock["samples_per_second"])
    assert "| convnet | opacus_hooks |" in (tmp_path / "bench.md").read_text()


def test_an_engine_that_raises_is_recorded_as_unsupported(tmp_path):
    """ExpandedWeights cannot differentiate ViT's expanded class token: a record, not a crash."""
    records = _run(tmp_path, "--models", "vit", "--modes", "none,ew", "--steps", "1", "--repeats", "1",
                   "--batch-size", "8", "model.embed_dim=16", "model.depth=1", "model.num_heads=2")
    ew = next(r for r in records if r["mode"] == "ew")
    assert ew["status"] == "unsupported" and ew["samples_per_second"] is None
    assert "Expanded Weights" in ew["reason"] and "\n" not in ew["reason"]
    assert "Expanded Weights" in (tmp_path / "bench.md").read_text()


def _record(model: str, mode: str, samples_per_second: float) -> dict:
    return {"model": model, "mode": mode, "device": "cpu", "device_name": "test", "batch_size": 256,
            "physical_batch_size": 64, "steps": 1, "repeats": 1, "torch_threads": 1, "torch_version": "x",
            "opacus_version": "y", "memory_method": "z", "load_average_before": 0.0,
            "load_average_after": 0.0, "status": "ok", "samples_per_second": samples_per_second,
            "peak_memory_mb": 1.0}


def test_merge_replaces_a_models_records_and_keeps_the_others(tmp_path):
    old = [_record("resnet18", "none", 10.0), _record("convnet", "none", 1.0)]
    bench.add_ratios(old)
    (tmp_path / "bench.json").write_text(json.dumps(old))
    new = [_record("convnet", "none", 40.0), _record("convnet", "hooks", 20.0)]
    bench.add_ratios(new)
    bench.write_outputs(new, tmp_path, merge=True)
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["model"], r["mode"], r["samples_per_second"]) for r in merged] == [
        ("resnet18", "none", 10.0), ("convnet", "none", 40.0), ("convnet", "hooks", 20.0)]
    assert merged[2]["time_ratio_vs_none"] == 2.0
    assert "| resnet18 | none |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--modes", "none,fastest"], "unknown mode 'fastest'"),
    (["--models", "resnet9000"], "no config conf/model/resnet9000.yaml"),
    (["--models", "svm"], "svm does not train on images with DP-SGD"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
])
def test_bad_arguments_are_refused_in_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_a_bad_override_fails_before_anything_is_timed(tmp_path):
    with pytest.raises(SystemExit, match="dp_sweeps.bench: error: .*no_such_key"):
        bench.main(["--out", str(tmp_path), "--models", "convnet", "model.no_such_key=1"])
    assert not (tmp_path / "bench.json").exists()


def test_docs_page_section_is_regenerated_with_its_stamp(tmp_path):
    """--docs writes bench.md into the page's generated section (date, machine, command)
    and leaves the hand-written part alone; a second run replaces the section."""
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nHand-written measurements.\n")
    args = ("--models", "convnet", "--modes", "none", "--steps", "1", "--repeats", "1", "--batch-size", "8",
            "--physical-batch-size", "8", "--docs", str(page), *TINY_CONVNET)
    _run(tmp_path, *args)
    first = page.read_text()
    assert first.startswith("# Benchmarks\n\nHand-written measurements.\n")
    assert first.count(bench.DOCS_BEGIN) == first.count(bench.DOCS_END) == 1
    assert "- **Date:** " in first and f"torch {torch.__version__}" in first
    assert "- **Command:** `python -m dp_sweeps.bench --out " in first and "--models convnet --modes none" in first
    assert "| convnet | none |" in first and "\n# dp_sweeps benchmark" not in first
    _run(tmp_path, *args)
    assert page.read_text().count(bench.DOCS_BEGIN) == 1  # replaced, not appended again
