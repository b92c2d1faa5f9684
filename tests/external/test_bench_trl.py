"""`minigrpo bench trl`: the harness runs both frameworks with tiny settings and reports medians and ratios;
`minigrpo bench step`: the same harness, minigrpo with each rollout backend."""

import importlib.util
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


@pytest.mark.slow
def test_bench_step_times_each_backend() -> None:
    """`minigrpo bench step`: a whole step per rollout backend, medians and the ratio to the first backend."""
    from minigrpo.tools.bench import bench_step

    report = bench_step(backends=("engine", "hf"), steps=2, reps=1, num_generations=4, prompts_per_step=2,
                        max_completion_length=8, train_size=64)
    assert report["settings"]["backends"] == ["engine", "hf"]
    engine, hf = report["results"]["engine"], report["results"]["hf"]
    assert engine["step_s_over_engine"] == 1.0
    assert hf["step_s_over_engine"] == hf["median_step_s"] / engine["median_step_s"]
    for figures in (engine, hf):
        assert figures["timed_steps"] == 1  # 2 steps, the first dropped as warm-up
        assert 0 < figures["median_generate_s"] < figures["median_step_s"]


@pytest.mark.parametrize("flags, message", [
    (["--backends=engine,sglang"], "--backends: got 'engine,sglang'; expected distinct names among"),
    (["--backends=engine,engine"], "expected distinct names"),
    (["--beta=0.04,0"], "--beta: bench step takes one KL coefficient"),
    (["--steps=1"], "--steps"),
])
def test_bench_step_refuses_bad_flags(flags, message, capsys) -> None:
    from minigrpo.cli import main

    assert main(["bench", "step", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the refusal without vLLM")
def test_bench_step_with_vllm_needs_vllm(capsys) -> None:
    from minigrpo.cli import main

    assert main(["bench", "step", "--backends=engine,vllm-adapter"]) == 2  # refused before any run
    assert "--backends: vllm needs the vllm package" in capsys.readouterr().err
