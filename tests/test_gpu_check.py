"""``python -m dp_sweeps.gpu_check``: the paper grid counted from the configs, the cost
formula, failures kept as findings (never hidden), and a small smoke run on the CPU
(CI also runs the full ``make gpu-check ARGS=--smoke``, .ci/run)."""

from __future__ import annotations

import json

import pytest

from dp_sweeps import bench, gpu_check


@pytest.mark.slow
def test_paper_grid_is_counted_from_the_experiment_configs():
    runs = gpu_check.paper_grid_runs("full")
    epsilon = [r for r in runs if r["experiment"] == "epsilon"]
    # conf/experiment/paper_epsilon.yaml: 5 models x 5 ε x 3 seeds at 100 epochs on all 50,000 images.
    assert len(epsilon) == 75
    assert {r["model"] for r in epsilon} == {"convnet", "resnet18", "efficientnet", "vit", "densenet121"}
    assert {(r["epochs"], r["batch_size"], r["num_train"]) for r in epsilon} == {(100, 256, 50_000)}
    assert all(r["classical"] for r in runs if r["experiment"] == "classical")
    assert {r["epochs"] for r in runs if r["experiment"] == "epochs"} == {10, 20, 50, 100}
    de = gpu_check.de_wrn16_4_runs()
    assert {(r["epsilon"], r["epochs"]) for r in de} == {(1, 67), (2, 87), (4, 123), (8, 190)}
    assert {(r["batch_size"], r["augmult"]) for r in de} == {(4096, 16)}


def _records(model: str, batch: int, *, dp: float, non_private: float, precision: str = "fp32") -> list[dict]:
    return [{"model": model, "batch_size": batch, "precision": precision, "auto_engine": "hooks", "mode": mode,
             "samples_per_second": sps} for mode, sps in ((bench.NON_PRIVATE, non_private), ("hooks", dp))]


def test_cost_is_epochs_times_train_and_evaluation_time():
    runs = [{"experiment": "x", "model": "convnet", "epochs": 10, "batch_size": 256, "num_train": 50_000,
             "num_eval": 10_000, "classical": False},
            {"experiment": "x", "model": "svm", "epochs": 1, "batch_size": 256, "num_train": 50_000,
             "num_eval": 10_000, "classical": True},
            {"experiment": "x", "model": "vit", "epochs": 5, "batch_size": 256, "num_train": 50_000,
             "num_eval": 10_000, "classical": False}]
    de = [{"epsilon": 8, "epochs": 190, "augmult": 16, "num_train": 50_000, "num_eval": 10_000}]
    records = _records("convnet", 256, dp=1000.0, non_private=2000.0) + _records("wrn16_4", 4096, dp=500.0,
                                                                                   non_private=1000.0)
    costs = gpu_check.cost_estimates(records, paper_runs=runs, de_runs=de)
    fp32 = costs["by_precision"]["fp32"]
    assert fp32["paper_gpu_hours"] == pytest.approx(10 * (50_000 / 1000 + 10_000 / (3 * 2000)) / 3600)
    assert fp32["paper_models_not_measured"] == ["vit"]  # counted, not costed, and said so
    assert fp32["de_wrn16_4"][0]["gpu_hours"] == pytest.approx(190 * (50_000 * 16 / 500 + 10_000 / 3000) / 3600)
    assert costs["by_precision"]["bf16"]["paper_gpu_hours"] is None
    assert costs["paper_classical_runs"] == 1 and "3600" in costs["formula"]


def test_a_failing_item_is_a_finding_and_the_check_goes_on(monkeypatch, capsys):
    def cuda_failure(model_name, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(bench, "bench_model", cuda_failure)
    plan = gpu_check.check_plan(smoke=True, models=["convnet"])
    report = gpu_check.Report(meta={})
    gpu_check.run_benchmark(plan.bench_items[0], precision="fp32", plan=plan, report=report)
    assert report.findings[0]["item"] == "bench convnet batch 8 fp32"
    assert report.findings[0]["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert "FINDING: bench convnet batch 8 fp32" in capsys.readouterr().err
    assert report.bench == []  # no record stands in for the failed one


def test_no_data_and_no_build_script_is_a_finding_outside_the_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "BUILD_SCRIPTS", (tmp_path / "absent.py",))
    report = gpu_check.Report(meta={})
    assert gpu_check.ensure_cifar10(tmp_path / "none", smoke=False, report=report) is None
    assert "no CIFAR-10 copy" in report.findings[0]["error"]
    root, what = gpu_check.ensure_cifar10(tmp_path / "none", smoke=True, report=gpu_check.Report(meta={}))
    assert (root / "cifar-10-batches-py" / "test_batch").is_file() and what.startswith("synthetic")


@pytest.mark.slow
def test_smoke_writes_the_report(tmp_path, monkeypatch):
    data = gpu_check.write_synthetic_cifar10(tmp_path / "data")
    monkeypatch.setattr(gpu_check, "BUILD_SCRIPTS", ())
    out = tmp_path / "gpu-check"
    # fp32 only: CPU bf16 is emulated and slow; CI's full smoke (.ci/run) and test_precision.py cover bf16.
    status = gpu_check.main(["--smoke", "--models", "convnet", "--epoch-models", "convnet", "--precisions", "fp32",
                             "--out", str(out), "--data-root", str(data)])
    report = json.loads((out / "report.json").read_text())
    assert status == 0 and report["findings"] == [] and report["skipped"] == []
    measured = {(r["precision"], r["mode"]) for r in report["bench"] if r["status"] == "ok"}
    assert measured == {("fp32", m) for m in ("none", "hooks", "opacus_hooks")}
    (epoch,) = report["epochs"]
    assert epoch["status"] == "completed" and 0 < epoch["epsilon"] <= epoch["target_epsilon"] * 1.001
    assert epoch["precision"] == "fp32" and 0 <= epoch["test_accuracy"] <= 1
    assert report["costs"]["by_precision"]["fp32"]["paper_per_model"]["convnet"]["runs"] == 78
    text = (out / "report.md").read_text()
    assert "target ≤ 1.3×" in text and "fastDP reports < 1.25×" in text and "GPU-hours = Σ" in text
