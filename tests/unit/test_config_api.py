"""Config from Python: values of the right kind are taken as YAML's would be (paths, tuples, numpy numbers),
wrong ones refused with the key named; the choice keys read their names from the tables that implement them."""

from pathlib import Path

import numpy as np
import pytest

from minigrpo import rollout
from minigrpo.algo import LOSS_TYPES
from minigrpo.config import Config, table_names
from minigrpo.errors import ConfigError
from minigrpo.tasks.prompts import TEMPLATES


def test_python_values_are_coerced_like_yaml_values():
    cfg = Config(output_dir=Path("/tmp/run"), reward_funcs=("correctness", "format_soft"),
                 max_steps=np.int64(3), learning_rate=np.float32(0.5), epsilon=1)
    assert cfg.output_dir == "/tmp/run" and cfg.reward_funcs == ["correctness", "format_soft"]
    assert type(cfg.max_steps) is int and cfg.max_steps == 3
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 0.5 and type(cfg.epsilon) is float


@pytest.mark.parametrize("key, value, message", [
    ("max_steps", "3", "max_steps: got '3' (str), expected an integer"),
    ("max_steps", 2.5, "max_steps: got 2.5 (float), expected an integer"),
    ("use_peft", 1, "use_peft: got 1 (int), expected true or false"),
    ("beta", True, "beta: got True (bool), expected a number"),
    ("loss_type", "ppo", "loss_type: got 'ppo', expected one of ['grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo'] (or "
                         "TRL's cispo, sapo, vespo, which set loss_mode too)"),
    ("rollout_backend", "sglang", "rollout_backend: got 'sglang', expected one of ['engine', 'hf', 'vllm']"),
])
def test_wrong_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as e:
        Config(**{key: value})
    assert str(e.value) == message


def test_choices_come_from_the_tables():
    assert table_names("loss_type") == list(LOSS_TYPES)
    assert table_names("rollout_backend") == list(rollout.BACKENDS)
    assert table_names("template") == list(TEMPLATES)


def test_grpo_rules_are_checked_by_validate_grpo_only():
    cfg = Config(per_device_train_batch_size=6)  # fine for SFT: no groups
    with pytest.raises(ConfigError, match="num_generations: 8 must divide"):
        cfg.validate_grpo()
    with pytest.raises(ConfigError, match="reward_weights: 1 weights for 2 reward_funcs"):
        Config(reward_funcs=["correctness", "format_soft"], reward_weights=[1.0]).validate_grpo()
