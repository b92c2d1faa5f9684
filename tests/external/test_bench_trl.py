"""`minigrpo bench trl`: the harness runs both frameworks with tiny settings and reports medians and ratios."""

import math

import pytest


@pytest.mark.slow
def test_bench_trl_report_structure() -> None:
    pytest.importorskip("trl")
    from minigrpo.tools.bench import bench_trl

    report = bench_trl(steps=2, reps=1, betas=(0.04,), num_generations=4, prompts_per_step=2,
                       max_completion_length=8, train_size=64)
    assert report["settings"]["betas"] == [0.04]
    result = report["results"]["0.04"]
    for name in ("trl", "minigrpo"):
        figures = result[name]
        assert figures["timed_steps"] == 1  # 2 steps, the first dropped as warm-up
        assert figures["median_step_s"] > 0 and figures["peak_rss_mb"] > 0
        assert math.isfinite(figures["median_tokens_per_s"]) and figures["median_tokens_per_s"] > 0
    ratios = result["ratio_minigrpo_over_trl"]
    assert set(ratios) == {"step_s", "tokens_per_s", "peak_rss"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())


def test_bench_trl_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    from minigrpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "trl", "--help"])
    assert exc.value.code == 0
    assert "GRPOTrainer" in capsys.readouterr().out
