"""benchmarks/studies/scale.py: one tiny size through every stage, and the exponent fit and report."""

import math

import pytest

from _testing import benchmark_module

pytest.importorskip("pynndescent")
scale = benchmark_module("studies.scale")


def test_every_stage_runs_and_reports_at_a_tiny_size():
    lines = []
    # 150 users x 1,500 items: some items are never drawn, so the model is built for the items seen.
    res = scale.run_size(150, 1500, stages=list(scale.STAGES), exact_max_users=1000, quick=True, log=lines.append)
    assert res["items_seen"] < 1500
    for stage in scale.STAGES:
        assert stage in res, stage
        assert res[stage]["seconds"] >= 0 and res[stage]["peak_mb"] >= 0, stage
    approx = res["similar-approx"]
    assert 0.9 <= approx["recall@10"] <= 1.0 and approx["recall@10"] <= approx["tie_recall@10"] <= 1.0
    assert approx["n_sim_k_abs_diff"] >= 0 and approx["n_sim_k_users"] == 150
    assert res["interactions"] > 150
    # Loading the written file keeps every interaction the records had.
    assert res["load"]["interactions"] == res["interactions"]
    assert any("refit-iteration" in line for line in lines)


def test_exponent_and_report():
    pts = [{"n_users": n, "n_items": 10, "split": {"seconds": 0.5 * n ** 1.1, "peak_mb": 1.0},
            "similar-exact": {"seconds": 1e-6 * n * n, "peak_mb": 2.0},
            "ease": {"refused": "ease: too many items"}} for n in (100, 1000, 10000)]
    assert scale.exponent(pts, "split", "n_users") == pytest.approx(1.1)
    assert scale.exponent(pts, "similar-exact", "n_users") == pytest.approx(2.0)
    assert scale.exponent(pts, "ease", "n_users") is None
    text = scale.report(pts, users_axis_items=10, items_axis_users=-1)
    assert "| split | " in text and "| 1.10 |" in text and "| 2.00 |" in text and "refused" in text
    assert math.isfinite(scale.exponent(pts, "split", "n_users"))


def test_recall_on_a_data_set_is_one_when_every_user_is_a_candidate():
    # width >= n_users - 1: every other user is a candidate, so the approximate table is the exact one.
    rows = scale.recall_on(["synthetic"], [599], log=lambda line: None)
    (r,) = rows
    assert r["users"] == 600 and r["width"] == 599
    assert r["recall@10"] == 1.0 and r["tie_recall@10"] == 1.0
    assert r["n_sim_k_abs_diff"] == 0.0 and r["n_sim_k_exact"] == r["n_sim_k_approx"]
