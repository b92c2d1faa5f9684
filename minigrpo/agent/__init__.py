"""Agents: multi-turn rollouts in which the model calls tools between its turns.

    tools.py    tools from typed Python callables (TRL's convention), the call formats, running calls
    sandbox.py  where model-written code runs: bubblewrap namespaces + a seccomp filter + resource limits
    turns.py    what happens when an assistant turn ends (shared by every rollout backend)
"""
