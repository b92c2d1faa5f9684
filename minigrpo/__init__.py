"""minigrpo: a small, hackable GRPO trainer. From Python (minigrpo/api.py, TRL's shape):

    from minigrpo import GRPOConfig, GRPOTrainer

From the shell: `minigrpo train` (minigrpo/cli.py). The names load on first use: `import minigrpo` (and the
command line) stays free of torch until a trainer is made.
"""

__all__ = ["Callback", "ConfigError", "DataError", "GRPOConfig", "GRPOTrainer", "SFTConfig", "SFTTrainer",
           "TrainResult", "TrainingStopped"]


def __getattr__(name: str):  # PEP 562: lazy, so the CLI's start stays fast
    if name in ("ConfigError", "DataError", "TrainingStopped"):
        from minigrpo import errors  # here: on first use, as the API below

        return getattr(errors, name)
    if name in __all__:
        from minigrpo import api  # here: the API loads torch when a trainer is made; the CLI must start without it

        return getattr(api, name)
    raise AttributeError(f"module 'minigrpo' has no attribute {name!r}")
