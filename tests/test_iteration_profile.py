"""benchmarks/studies/iteration_profile.py: the stages an iteration's profile is sorted into, on a tiny run."""

import os

from _testing import benchmark_module


def test_iteration_profile_sorts_the_time_of_an_iteration_into_stages(capsys, monkeypatch):
    study = benchmark_module("studies.iteration_profile")
    assert study._stage("GeneratedBackwardFor_refit_policy_loss_default") == "log-likelihood / policy loss (kernel)"
    assert study._stage("refit::gaussian_logprob_backward") == "log-likelihood / policy loss (kernel)"
    assert study._stage("refit::topk_hits") == "reward and gathers (kernels)"
    assert study._stage("aten::addmm") == "denoiser matrix products"
    assert study._stage("aten::tanh") == "other tensor operators"
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    study.main(["--data", "synthetic", "--batch-size", "8", "--warmup", "1", "--iterations", "1"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line and "stage" not in line}
    kernels, reference = (float(v) for v in rows["log-likelihood / policy loss (kernel)"])
    assert kernels > 0 and reference == 0  # the reference run's log-likelihood is plain tensor operators
    assert float(rows["denoiser matrix products"][0]) > 0
    assert "REFIT_BACKEND" not in os.environ
