"""report_to: the Monitor's metrics and completions reach wandb (offline) and trackio (local) with their names and
values, read back from what those libraries wrote; bad names and missing packages fail before any run folder."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minigrpo import monitor
from minigrpo.config import Config
from minigrpo.errors import ConfigError
from minigrpo.monitor import Monitor, check_report_to

# The names the loop logs (those its progress line reads among them); values exact in binary and in JSON.
STEPS = {step: {"train/reward": step / 4, "train/accuracy": step / 8, "train/kl": step / 16,
                "train/frac_reward_zero_std": 0.5, "completions/mean_length": 12.0 + step, "perf/step_s": 0.25}
         for step in (1, 2, 3)}
STEPS[3] |= {"eval/accuracy": 0.625, "eval/format": 0.75}
ROWS = [{"prompt": "1+2?", "completion": "#### 3", "reward": 1.0, "rewards/correctness": 1.0, "advantage": 0.5,
         "answer": "3"},
        {"prompt": "2+2?", "completion": "#### 5", "reward": 0.0, "rewards/correctness": 0.0, "advantage": -0.5,
         "rewards/format": 1.0}]  # no answer: the table's answer cell is empty
COLUMNS = ["step", "prompt", "completion", "reward", "rewards/correctness", "advantage", "answer", "rewards/format"]
DATA = [[3, "1+2?", "#### 3", 1.0, 1.0, 0.5, "3", None], [3, "2+2?", "#### 5", 0.0, 0.0, -0.5, None, 1.0]]

# A child process: trackio reads TRACKIO_DIR when it is imported, and wandb's service keeps the environment it
# started with, so each gets this test's folders only in a fresh process. It also reads trackio's logs back.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from minigrpo.monitor import Monitor
    steps, rows, run_dir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
    run_dir.mkdir()
    m = Monitor(run_dir, 3, show=False, report_to=["wandb", "trackio"], config={"beta": 0.04, "model": "tiny"})
    for step, metrics in steps.items():
        m.log(int(step), metrics)
    m.samples(3, rows)
    m.close()
    from trackio.sqlite_storage import SQLiteStorage
    print(json.dumps(SQLiteStorage.get_logs("trackio-project", run_dir.name)))
""")


def wandb_records(path: Path) -> list:
    """The records of a .wandb file. wandb ships no Python reader for it (its service, in Go, writes it): a header
    (':W&B', magic, version: 7 bytes), then LevelDB-log chunks (crc32, length, type: 7 bytes) in 32 KiB blocks,
    whose payloads are wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, records, pos, payload = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of the file
            break
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


@pytest.mark.slow
def test_wandb_offline_and_trackio_local_get_every_metric_and_the_completions_table(tmp_path):
    run_dir = tmp_path / "run-7"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_", "XDG_", "HF_"))}
    env |= {"OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"), "WANDB_MODE": "offline",  # no WANDB_DIR
            "WANDB_PROJECT": "wandb-project",  # HOME: wandb's cache and staging folders (~/.cache, ~/.local)
            "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "trackio-project"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(STEPS), json.dumps(ROWS), str(run_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    # Quiet: trackio's banner and wandb's are not printed (WANDB_SILENT by default; trackio's print()s captured).
    assert out.stdout.count("\n") == 1, out.stdout

    # wandb: one offline run in the run folder, named after it, in WANDB_PROJECT, with the config.
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("run-7", "wandb-project")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {"beta": 0.04, "model": "tiny"}
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            # a metric's key is its name ("train/reward"); the table's are its fields ("completions", "_type"),
            # beside the metric completions/mean_length as in TRL's runs
            items = {item.key or (item.nested_key[0] if len(item.nested_key) == 1 else tuple(item.nested_key)):
                     json.loads(item.value_json) for item in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
    assert sorted(history) == [1, 2, 3]
    for step, metrics in STEPS.items():
        assert {k: v for k, v in history[step].items() if isinstance(k, str) and "/" in k} == metrics
    assert history[3]["completions", "_type"] == "table-file"
    (table_file,) = wandb_file.parent.glob("files/" + history[3]["completions", "path"])
    table = json.loads(table_file.read_text())
    assert table["columns"] == COLUMNS and table["data"] == DATA
    assert not (run_dir / "tensorboard").exists()  # not asked for
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # trackio: TRACKIO_PROJECT's SQLite file in TRACKIO_DIR, read back through trackio's own storage.
    assert (tmp_path / "trackio" / "trackio-project.db").is_file()
    logs = json.loads(out.stdout)
    scalars = [{k: v for k, v in row.items() if k not in ("timestamp", "step")} | {"step": row["step"]}
               for row in logs if "completions" not in row]
    assert scalars == [metrics | {"step": step} for step, metrics in STEPS.items()]
    (tables,) = [row for row in logs if "completions" in row]
    assert tables["step"] == 3 and tables["completions"]["_type"] == "trackio.table"
    assert tables["completions"]["_value"] == [dict(zip(COLUMNS, row)) for row in DATA]


class Recorder:
    """A backend that keeps what it is given."""

    made: list[Recorder] = []

    def __init__(self, run_dir: Path, run_name: str, config: dict | None) -> None:
        self.args, self.logged, self.tables, self.closed = (run_dir, run_name, config), [], [], 0
        Recorder.made.append(self)

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def table(self, step, columns, data):
        self.tables.append((step, columns, data))

    def close(self):
        self.closed += 1


def test_every_backend_gets_the_metrics_the_table_of_all_keys_and_one_close(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor, "BACKENDS", {**monitor.BACKENDS, "wandb": Recorder, "mlflow": Recorder})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    Recorder.made = []
    m = Monitor(tmp_path, 3, show=False, report_to=["wandb", "mlflow", "wandb"], config={"beta": 0.0},
                run_name="named")
    m.log(1, STEPS[1])
    m.samples(3, ROWS)
    m.samples(4, [])  # nothing sampled: no table
    m.close()
    m.close()
    assert len(Recorder.made) == 2  # a repeated name is one backend
    for r in Recorder.made:
        assert r.args == (tmp_path, "named", {"beta": 0.0})
        assert r.logged == [(1, STEPS[1])] and r.tables == [(3, COLUMNS, DATA)] and r.closed == 1
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_run_name_defaults_to_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor, "BACKENDS", {**monitor.BACKENDS, "trackio": Recorder})
    Recorder.made = []
    Monitor(tmp_path, 1, show=False, report_to=["trackio"]).close()
    assert Recorder.made[0].args[1] == tmp_path.name


@pytest.mark.parametrize("names", [["none"], []])
def test_none_writes_metrics_jsonl_only(tmp_path, names):
    m = Monitor(tmp_path, 1, show=False, report_to=names)
    m.log(1, STEPS[1])
    m.close()
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, **STEPS[1]}


def test_the_default_is_tensorboard(tmp_path):
    m = Monitor(tmp_path, 1, show=False)
    m.log(1, STEPS[1])
    m.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("names, message", [
    (["tensorbord"], "report_to: got 'tensorbord', expected entries from ['tensorboard', 'wandb', 'trackio', "
                     "'mlflow', 'none']"),
    (["none", "wandb"], "report_to: 'none' means metrics.jsonl only; it cannot stand beside others"),
])
def test_bad_names_are_config_errors(tmp_path, names, message):
    with pytest.raises(ConfigError) as e:
        Config(report_to=names)
    assert str(e.value).startswith(message)
    with pytest.raises(ConfigError):
        Monitor(tmp_path, 1, show=False, report_to=names)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_missing_package_is_a_config_error_before_any_file(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else find_spec(name))
    check_report_to(["tensorboard", "wandb"])  # installed: no error
    with pytest.raises(ConfigError, match=r"^report_to: trackio is not installed: pip install trackio$"):
        check_report_to(["wandb", "trackio"])
    with pytest.raises(ConfigError, match="trackio is not installed"):
        Monitor(tmp_path, 1, show=False, report_to=["trackio"])
    assert list(tmp_path.iterdir()) == []
    assert Config(report_to=["trackio"]).report_to == ["trackio"]  # a config is checked for names, not packages
