"""The compat home: no module but minigrpo/compat.py reaches into a dependency's internals, and each reach
compat makes still works on the installed versions (an upgrade that breaks one fails here, by name)."""

from __future__ import annotations

import ast
import inspect
import logging
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

from minigrpo import compat
from minigrpo.compat import (
    PRIVATE_NAMES,
    PreallocatedLayer,
    attn_implementation,
    cache_kwargs,
    checkpointing_enabled,
    enable_checkpointing,
    preallocate,
)
from minigrpo.config import Config
from minigrpo.model import MergedLinear, apply_lora, merged_lora
from minigrpo.tiny import tiny_model, tiny_tokenizer

PACKAGE = Path(compat.__file__).parent
DEPENDENCIES = {"transformers", "peft", "accelerate", "deepspeed", "vllm", "torch", "trl", "datasets"}
ACCESSORS = {"getattr", "hasattr", "setattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every private name of another library that `source` uses.

    - an import from a private module of a dependency (`from transformers._x import A`, `import torch._dynamo`)
      or of a private name (`from peft.tuners import _helper`);
    - an attribute with a leading underscore read or written on anything but `self` / `cls` or a minigrpo
      module (`config._attn_implementation`, `engine._invalidate_trace()`);
    - the same name given as a string to getattr / hasattr / setattr / delattr.
    """
    tree = ast.parse(source)
    own_modules = {"self", "cls"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "minigrpo":
                own_modules |= {a.asname or a.name for a in node.names}
            elif parts[0] in DEPENDENCIES:
                found += [(node.lineno, p) for p in parts if _private(p)]
                found += [(node.lineno, a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "minigrpo":
                    own_modules.add(a.asname or parts[0])
                elif parts[0] in DEPENDENCIES:
                    found += [(node.lineno, p) for p in parts if _private(p)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in own_modules):
                found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCESSORS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            found.append((node.lineno, node.args[1].value))
    return sorted(found)


def test_the_scanner_finds_each_kind_of_private_use():
    source = ("from transformers.cache_utils import _private_helper\n"
              "import torch._dynamo\n"
              "from minigrpo import data\n"
              "x = model.config._attn_implementation\n"
              "y = getattr(cfg, '_attn_implementation', None)\n"
              "engine.coordinator._invalidate_trace()\n"
              "ok = self._own + data._gold_final('') + obj.__class__.__name__\n")
    assert private_uses(source) == [(1, "_private_helper"), (2, "_dynamo"), (4, "_attn_implementation"),
                                    (5, "_attn_implementation"), (6, "_invalidate_trace")]


def test_no_module_but_compat_uses_a_dependencys_private_names():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "compat.py":
            uses = private_uses(path.read_text())
            if uses:
                offenders[str(path.relative_to(PACKAGE.parent))] = uses
    assert not offenders, (f"private names of other libraries outside minigrpo/compat.py: {offenders}. "
                           "Move the reach into compat.py (with the versions it was tested on) and list it there")


def test_compat_lists_exactly_the_private_names_it_uses():
    used = {name for _, name in private_uses(Path(compat.__file__).read_text())}
    assert used == set(PRIVATE_NAMES), (used - set(PRIVATE_NAMES), set(PRIVATE_NAMES) - used)


# ---- each reach still works on the installed versions ----------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_ids():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0).eval()
    ids = torch.tensor([tok("What is 12+30?").input_ids])
    return model, ids


def test_cache_argument_is_the_one_the_model_declares(model_and_ids):
    model, _ = model_and_ids
    name, = cache_kwargs(model, None)
    assert name in inspect.signature(type(model).forward).parameters
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)
    assert name == ("cache" if new else "past_key_values"), (transformers.__version__, name)


def test_preallocated_cache_decodes_as_dynamic_cache_and_without_warnings(model_and_ids, caplog):
    """A few greedy decode steps with the in-place cache give the same logits as DynamicCache, dropping a row
    on the way, and transformers logs no deprecation (the `cache` / `past_key_values` rename)."""
    model, ids = model_and_ids
    ids = ids.repeat(3, 1)
    results = []
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("error")
        for grow in (False, True):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
                if grow:
                    preallocate(cache, 8)
                    assert all(type(layer) is PreallocatedLayer for layer in cache.layers)
                steps, tokens, rows = [], ids[:, -1:], torch.arange(3)
                for t in range(5):
                    tokens = out.logits[:, -1:].argmax(-1)
                    if t == 2:  # a finished row leaves the batch
                        rows, tokens = rows[[0, 2]], tokens[[0, 2]]
                        cache.batch_select_indices(torch.tensor([0, 2]))
                    out = model(input_ids=tokens, **cache_kwargs(model, cache), use_cache=True)
                    steps.append(out.logits[:, -1])
                assert cache.get_seq_length() == ids.shape[1] + 5
            results.append(steps)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()], caplog.text


def test_attention_backend_and_checkpointing_flags_are_read_without_warnings():
    model = tiny_model(tiny_tokenizer(), seed=0)
    assert attn_implementation(model) in ("sdpa", "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old `is_gradient_checkpointing` name warns on transformers 5
        assert checkpointing_enabled(model) is False
        enable_checkpointing(model)
        assert checkpointing_enabled(model) is True


def test_merged_lora_marks_the_layers_it_folds():
    tok = tiny_tokenizer()
    model = apply_lora(tiny_model(tok, seed=0), Config(use_peft=True, lora_r=4, lora_target_modules=["q_proj"]))
    with merged_lora(model):
        merged = [n for n, m in model.named_modules() if isinstance(m, MergedLinear)]
    assert merged and all(n.endswith("q_proj") for n in merged)
    assert not any(isinstance(m, MergedLinear) for m in model.modules())  # put back on exit
