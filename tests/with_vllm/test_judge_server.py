"""The LLM judge against a real OpenAI-compatible server: vLLM's CPU build serving the shipped tiny-arith model
(`python -m vllm.entrypoints.openai.api_server`, started here). The server judge's verdicts equal the local judge's
(greedy, fp32 both: the engine and vLLM agree), and it drives 2 GRPO steps."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm")]
ASSET = Path(__file__).resolve().parents[2] / "minigrpo" / "assets" / "tiny-arith"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ASSET),
                                 "--served-model-name", "tiny-arith", "--port", str(port), "--dtype", "float32",
                                 "--enforce-eager", "--max-model-len", "512"], stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"the server did not answer in 300 s: {log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rubric(tmp_path):
    path = tmp_path / "rubric.txt"
    path.write_text("{answer}")  # the "answer" is an arith question, which the judge works out: its #### N
    return str(path)


def test_a_server_judge_scores_a_batch_as_the_local_judge_does(server, tmp_path):
    import asyncio

    from minigrpo.tasks.model_rewards import Judge, parse_score
    from minigrpo.tasks.rewards import RewardGuard, score

    questions = ["What is 2 + 3?", "What is 4 + 4?", "What is 9 + 9?", "What is 7 + 1?"]
    served = Judge("tiny-arith", rubric=rubric(tmp_path), base_url=server, pattern=r"####\s*(\d+)", max_tokens=32,
                   concurrency=1)  # one request at a time: each alone in vLLM's batch, as deterministic as the engine
    values = asyncio.run(served.served(["p"] * 4, questions, question=["q"] * 4))
    local = Judge(str(ASSET), rubric=rubric(tmp_path), pattern=r"####\s*(\d+)", max_tokens=32)
    assert values == local(["p"] * 4, questions, question=["q"] * 4) and served.outputs == local.outputs
    assert sum(v is not None for v in values) >= 2 and served.failures == values.count(None)  # verdicts, parsed
    guard = RewardGuard(timeout=60)  # through score(): awaited with the async rewards, timed
    totals, _ = score([("judge", served.served, 1.0)], ["p"] * 4, questions, {"question": ["q"] * 4}, guard=guard)
    # its own verdicts (not compared with the first call's: vLLM batches requests as they come, and a greedy
    # answer may change with the batch's shape)
    assert totals == [parse_score(o, 10, served.pattern) for o in served.outputs] and guard.seconds["judge"] > 0
    down = Judge("tiny-arith", base_url="http://127.0.0.1:9/v1", timeout=2, retries=0)  # nothing listens there
    assert asyncio.run(down.served(["p"], ["x"])) == [None] and down.failures == 1


def test_grpo_with_a_server_judge(server, tmp_path):
    from minigrpo.config import Config
    from minigrpo.train import train

    cfg = Config(model="tiny-random", dataset="arith", reward_funcs=["judge"], judge_model="tiny-arith",
                 judge_base_url=server, judge_rubric=rubric(tmp_path), judge_pattern=r"####\s*(\d+)",
                 judge_max_tokens=16, num_generations=4,
                 per_device_train_batch_size=4, max_completion_length=8, max_steps=2, eval_limit=0,
                 logging_steps=1, seed=0, output_dir=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "perf/reward/judge_s" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["perf/reward/judge_s"] > 0 for r in steps)
    assert all(0 <= r["train/rewards/judge/mean"] <= 1 for r in steps)  # verdicts came back: a signal
