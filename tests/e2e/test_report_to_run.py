"""A whole run with `report_to: [wandb, trackio]`, offline: both get every step of the run's metrics (the unit
tests in tests/unit/test_report_to.py read the logged values back in detail)."""

import json
import os
import subprocess
import sys

import pytest

# trackio reads TRACKIO_DIR when imported, and wandb's service keeps the environment it started with: a child
# process with this test's folders only. After the run, it reads trackio's logs back through trackio's storage.
READ_TRACKIO = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
                "print(json.dumps(SQLiteStorage.get_logs('minigrpo-test', sys.argv[1])))")


@pytest.mark.slow
def test_a_run_reports_to_wandb_offline_and_trackio(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_", "XDG_"))}
    env |= {"OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"), "WANDB_MODE": "offline",
            "WANDB_PROJECT": "minigrpo-test", "TRACKIO_DIR": str(tmp_path / "trackio"),
            "TRACKIO_PROJECT": "minigrpo-test"}
    out = subprocess.run([sys.executable, "-m", "minigrpo", "train", "--model=tiny-random", "--max_steps=2",
                          "--per_device_train_batch_size=16", "--max_completion_length=8", "--eval_limit=8",
                          "--eval_steps=0", "--logging_steps=1", "--report_to=wandb,trackio",
                          f"--output_dir={run}"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")  # wandb's offline run, in the run folder
    assert wandb_file.stat().st_size > 0
    assert not (run / "tensorboard").exists()  # not asked for
    logs = json.loads(subprocess.run([sys.executable, "-c", READ_TRACKIO, run.name], capture_output=True,
                                     text=True, env=env, timeout=120, check=True).stdout)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = [row for row in logs if "completions" not in row]
    assert [r["step"] for r in scalars] == [r["step"] for r in rows] == [0, 1, 2, 2]  # before, 2 steps, after
    for mine, theirs in zip(rows, scalars):  # the same names and values as metrics.jsonl
        assert {k: v for k, v in theirs.items() if k not in ("timestamp", "step")} == \
            {k: v for k, v in mine.items() if k != "step"}
    assert [row["step"] for row in logs if "completions" in row] == [1, 2]  # the completions table, each step
