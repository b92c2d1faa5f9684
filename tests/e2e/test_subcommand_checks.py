"""Every sub-command checks its flags and paths at start, as `train` does: a bad count, size, temperature, device or
output path exits 2 with a message naming the flag as typed, before any model loads (issue 17, class 5); `plot`
reads a metrics.jsonl whose last line was torn by a crash."""

import json
import time

import pytest

from minigrpo import model as model_module
from minigrpo.cli import main
from minigrpo.config import Config, save_config
from minigrpo.tools import export as export_module


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """Placeholders -> paths: {run} (a LoRA run folder: config.yaml, adapter/, metrics.jsonl), {empty} (an empty
    folder), {full} (a non-empty folder), {file} (a file), {missing} (nothing there); and no model may load."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    save_config(Config(use_peft=True), str(run / "config.yaml"))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/reward": 0.5}) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("keep me")
    (tmp_path / "file").write_text("a file")

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the flags were checked")

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(model_module, name, no_model)
    monkeypatch.setattr(export_module, "load_model", no_model)  # bound at its import
    monkeypatch.chdir(tmp_path)  # a default output (eval_test.json, runs/) would land here
    return {"run": run, "empty": tmp_path / "empty", "full": tmp_path / "full", "file": tmp_path / "file",
            "missing": tmp_path / "missing"}


M = ["--model", "tiny-arith"]
CASES = [  # (argv, what stderr names)
    (["eval", *M, "--batch_size", "-4"], "--batch_size: must be >= 1, got -4"),
    (["eval", *M, "--limit", "0"], "--limit: must be >= 1, got 0"),
    (["eval", *M, "--limit=-3"], "--limit: must be >= 1, got -3"),
    (["eval", *M, "--max_new_tokens", "0"], "--max_new_tokens: must be >= 1, got 0"),
    (["eval", *M, "--k", "4", "--temperature=-0.5"], "--temperature: must be >= 0, got -0.5"),
    (["eval", *M, "--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["eval", *M, "--k", "4", "--temperature", "0"], "--temperature: 0 is greedy decoding: the --k 4 samples"),
    (["eval", *M, "--k=-2"], "--k: must be >= 0, got -2"),
    (["eval", *M, "--k", "1"], "--k: 1 gives no pass@k"),
    (["eval", *M, "--device", "gpu"], "--device: got 'gpu'"),
    (["eval", "--adapter", "{missing}"], "--adapter {missing}: no such folder"),
    (["eval", "--adapter", "{empty}"], "--adapter {empty}: no adapter_config.json"),
    (["eval", *M, "--out", "{full}"], "--out {full}: a folder is there"),
    (["eval", *M, "--out", "{file}/report.json"], "--out {file}/report.json: {file} is a file, not a folder"),
    (["sample", *M, "--out", "s.jsonl", "--n", "0"], "--n: must be >= 1, got 0"),
    (["sample", *M, "--out", "s.jsonl", "--n=-1"], "--n: must be >= 1, got -1"),
    (["sample", *M, "--out", "s.jsonl", "--best_k", "0"], "--best_k: must be >= 1, got 0"),
    (["sample", *M, "--out", "s.jsonl", "--keep", "best", "--n", "4", "--best_k", "9"], "--best_k: 9 is more than"),
    (["sample", *M, "--out", "s.jsonl", "--temperature", "0"], "--temperature: 0 is greedy decoding: the --n 8"),
    (["sample", *M, "--out", "s.jsonl", "--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["sample", *M, "--out", "{full}"], "--out {full}: a folder is there"),
    (["sample", *M, "--out", "s.jsonl", "--reward_funcs", "correctnes"], "unknown reward 'correctnes'"),
    (["sample", *M, "--out", "s.jsonl", "--keep", "judge"], "--keep judge: give the judge, --judge MODEL"),
    (["sample", *M, "--out", "s.jsonl", "--judge_pattern", "V: (1)"], "--judge_pattern: there is no judge"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--judge_threshold", "1.5"],
     "--judge_threshold: must be <= 1, got 1.5"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--judge_rubric", "{missing}"],
     "--judge_rubric: '{missing}' is neither a built-in rubric (correct) nor a file"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--judge_pattern", "V: ([0-9]"],
     "--judge_pattern: 'V: ([0-9]' is not a regular expression"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--judge_pattern", "V: [0-9]"],
     "--judge_pattern: 'V: [0-9]' needs a group around the verdict's number"),
    (["sample", *M, "--out", "s.jsonl", "--judge_rubric", "r.txt"], "--judge_rubric: there is no judge to use it"),
    (["sample", *M, "--out", "s.jsonl", "--judge_threshold", "0.5"], "--judge_threshold: there is no judge"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--reward_funcs", "format"],
     "--best_k / --reward_funcs: with --keep judge only the judge's verdict decides"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--keep", "best", "--reward_funcs", "judge"],
     "--reward_funcs: judge is already scored with --judge"),
    (["sample", *M, "--out", "s.jsonl", "--judge", "tiny-arith", "--judge_max_tokens", "0"],
     "--judge_max_tokens: must be >= 1, got 0"),
    (["plot", "{missing}"], "RUN_DIR {missing}: no such folder"),
    (["plot", "{empty}"], "RUN_DIR {empty}: no metrics.jsonl there"),
    (["plot", "{run}", "--out", "{full}"], "--out {full}: a folder is there"),
    (["demo", "--scale", "0"], "--scale: must be > 0, got 0.0"),
    (["demo", "--scale=-1"], "--scale: must be > 0, got -1.0"),
    (["demo", "--scale", "inf"], "--scale: must be a finite number, got inf"),
    (["demo", "--out", "{full}"], "--out {full}: exists and is not empty"),
    (["demo", "--out", "{file}"], "--out {file}: a file is there"),
    (["bench", "rollout", *M, "--n", "0"], "--n: must be >= 1, got 0"),
    (["bench", "rollout", *M, "--reps", "0"], "--reps: must be >= 1, got 0"),
    (["bench", "rollout", *M, "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["bench", "rollout", *M, "--batch_size=-1"], "--batch_size: must be >= 1, got -1"),
    (["bench", "rollout", *M, "--temperature", "0"], "--temperature: 0 is greedy decoding: the --n 8"),
    (["bench", "trl", "--steps", "1"], "--steps: must be >= 2, got 1"),
    (["bench", "trl", "--reps", "0"], "--reps: must be >= 1, got 0"),
    (["bench", "trl", "--num_generations", "1"], "--num_generations: must be >= 2, got 1"),
    (["bench", "trl", "--prompts_per_step", "0"], "--prompts_per_step: must be >= 1, got 0"),
    (["bench", "trl", "--max_completion_length", "0"], "--max_completion_length: must be >= 1, got 0"),
    (["bench", "trl", "--learning_rate", "nan"], "--learning_rate: must be a finite number, got nan"),
    (["bench", "trl", "--seed=-1"], "--seed: must be >= 0, got -1"),
    (["bench", "trl", "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["bench", "trl", "--train_size", "0"], "--train_size: must be >= 1, got 0"),
    (["bench", "trl", "--beta", "0.04,x"], "--beta: expected comma-separated numbers, got '0.04,x'"),
    (["bench", "trl", "--device", "gpu"], "--device: got 'gpu'"),
    (["bench", "trl", "--out", "{full}"], "--out {full}: a folder is there"),
    (["bench", "memory", "--steps", "0"], "--steps: must be >= 2, got 0"),
    (["bench", "memory", "--beta=-1"], "--beta: must be >= 0, got -1.0"),
    (["plan", "--gpu_gb=-1"], "--gpu_gb: must be > 0, got -1.0"),
    (["plan", "--gpu_gb", "0"], "--gpu_gb: must be > 0, got 0.0"),
    (["plan", "--cpu_gb", "nan"], "--cpu_gb: must be a finite number, got nan"),
    (["plan", "--gpu_gb", "8", "--cpu_gb", "16"], "--cpu_gb: with --gpu_gb"),
    (["plan", "--temperature=-1"], "temperature: must be >= 0, got -1.0"),
    (["export", "{missing}", "--out", "new"], "RUN_DIR {missing}: no such folder"),
    (["export", "{empty}", "--out", "new"], "RUN_DIR {empty}: no config.yaml"),
    (["export", "{run}", "--out", "new", "--checkpoint", "5"], "--checkpoint 5: no"),
    (["export", "{run}", "--out", "new", "--checkpoint=-1"], "--checkpoint -1: no"),
    (["export", "{run}", "--out", "{full}"], "--out {full}: exists and is not empty"),
    (["export", "{run}", "--out", "{file}"], "--out {file}: a file is there"),
    (["export", "{run}", "--out", "{file}/sub"], "--out {file}/sub: {file} is a file, not a folder"),
    (["export", "{run}", "--out", "new", "--private"], "--private / --commit_message: only with --push_to_hub"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_flags_and_paths_exit_2_naming_the_flag_before_any_work(paths, capsys, argv, message):
    def fill(text):
        return text.format(**paths)

    t0 = time.perf_counter()
    assert main([fill(a) for a in argv]) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "error: " + fill(message) in err, err
    assert (paths["full"] / "keep").read_text() == "keep me" and not (paths["file"].parent / "new").exists()
    assert not (paths["run"] / "eval_test.json").exists() and not (paths["full"].parent / "runs").exists()
    assert seconds < 5, f"{seconds:.1f} s: more than a check"  # the libraries were imported with this module


def test_plot_reads_a_metrics_file_with_a_torn_last_line(tmp_path, capsys):
    rows = [{"step": s, "train/reward": 0.1 * s, "completions/mean_length": 10.0 + s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "train/rew'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "png" / "curves.png")]) == 0
    assert (tmp_path / "png" / "curves.png").stat().st_size > 0
    assert "left out 1 line(s)" in capsys.readouterr().err
