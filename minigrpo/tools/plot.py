"""`minigrpo plot RUN_DIR [RUN_DIR ...]`: the training curves of a run (metrics.jsonl) as one PNG; of several,
overlaid."""

from __future__ import annotations

from pathlib import Path

from minigrpo.errors import ConfigError, DataError
from minigrpo.monitor import read_jsonl

PANELS = [  # (title, metric names drawn in the panel)
    ("reward", ["train/reward"]),  # the per-function rewards are added below
    ("accuracy", ["train/accuracy", "eval/accuracy"]),  # and the run's eval/<metric>, added below
    ("tool use (share of samples)", ["tools/call_frequency", "eval/tool_call_frequency", "tools/failure_frequency"]),
    ("completion length", ["completions/mean_length"]),
    ("KL to reference", ["train/kl"]),
    ("entropy", ["train/entropy"]),
    ("step time (s)", ["perf/step_s", "perf/generate_s", "perf/train_s"]),
    ("|sampler - trainer| log-prob", ["rollout/logprob_diff_mean", "rollout/logprob_diff_max"]),  # log scale
]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of metrics.jsonl (one per step; evaluation rows share a step with training rows). A torn last line (a
    run killed while writing) is left out, with a message (monitor.read_jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"RUN_DIR {run_dir}: no such folder; give a run folder written by `minigrpo train` or `sft`")
    if not path.is_file():
        raise ConfigError(f"RUN_DIR {run_dir}: no metrics.jsonl there; give a run folder written by `minigrpo train` "
                          f"or `sft`")
    rows = [r for r in read_jsonl(path) if "step" in r]
    if not rows:
        raise DataError(f"{path}: no rows with a step yet; a run writes one per step")
    return rows


def series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, skipping rows without it or with null."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path | list[str | Path], out: str | Path | None = None) -> Path:
    """Draw the panels that have data and save them as RUN_DIR/curves.png (or `out`). Several run folders: their
    curves overlaid, each line labelled with its run's folder name (saved as the first run's compare.png)."""
    dirs = [Path(d) for d in (run_dir if isinstance(run_dir, list | tuple) else [run_dir])]
    runs = [(d, read_metrics(d)) for d in dirs]  # first: a bad RUN_DIR fails before matplotlib loads
    rows = [r for _, run_rows in runs for r in run_rows]  # every run's rows: which panels have data
    import matplotlib  # here: the backend must be chosen before pyplot loads

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt  # after use("Agg")

    reward_keys = sorted({k for r in rows for k in r if k.startswith("train/rewards/") and not k.endswith("/std")})
    # a run's own held-out metric (eval_metric: eval/<name>) joins the accuracy panel
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k not in
                        ("eval/accuracy", "eval/format", "eval/mean_length", "eval/tool_call_frequency")})
    panels = [(t, keys + reward_keys if t == "reward" else keys + eval_keys if t == "accuracy" else keys)
              for t, keys in PANELS]
    # A series that is absent or all zero (KL with beta = 0) gets no line; a panel with no line is dropped.
    panels = [(t, [k for k in keys if any(series(rows, k)[1])]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    cols = 3
    nrows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for i, (d, run_rows) in enumerate(runs):
            for j, key in enumerate(keys):
                x, y = series(run_rows, key)
                if not x:
                    continue
                # several runs: one colour per run, one line style per metric
                style = {} if len(runs) == 1 else {"color": f"C{i}", "linestyle": ["-", "--", ":", "-."][j % 4]}
                ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3,
                        label=key if len(runs) == 1 else f"{d.name}: {key}", **style)
        if title.startswith("|sampler"):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(" vs ".join(str(d) for d in dirs))
    fig.tight_layout()
    out = Path(out) if out else dirs[0] / ("curves.png" if len(dirs) == 1 else "compare.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
