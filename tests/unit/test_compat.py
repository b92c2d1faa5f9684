"""The compat home: no module but minigrpo/compat.py reaches into a dependency's internals, and each reach
compat makes still works on the installed versions (an upgrade that breaks one fails here, by name)."""

from __future__ import annotations

import ast
import importlib.util
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
from minigrpo.errors import ConfigError
from minigrpo.model import MergedLinear, apply_lora, merged_lora
from minigrpo.tiny import tiny_model, tiny_tokenizer

PACKAGE = Path(compat.__file__).parent
DEPENDENCIES = {"transformers", "peft", "accelerate", "deepspeed", "vllm", "torch", "trl", "datasets"}
ACCESSORS = {"getattr", "hasattr", "setattr", "delattr"}


STDLIB_PUBLIC = {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_exit"}  # namedtuple's API, os._exit


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in STDLIB_PUBLIC


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every private name of another library that `source` uses.

    - an import from a private module of a dependency (`from transformers._x import A`, `import torch._dynamo`,
      `importlib.import_module("transformers._x")`) or of a private name (`from peft.tuners import _helper`);
    - an attribute with a leading underscore read or written on anything but a minigrpo module, or on `self` /
      `cls` in a class of minigrpo's own (`config._attn_implementation`, `engine._invalidate_trace()`; in a
      subclass of a dependency's class `self._x` may be the parent's);
    - the same name as a keyword argument (`from_pretrained(p, _attn_implementation="sdpa")`), a string key
      (`cfg.to_dict()["_x"]`) or a string given to getattr / hasattr / setattr / delattr / attrgetter.
    """
    tree = ast.parse(source)
    own_modules, dependency_names = set(), set()
    found = []

    def check_module(line: int, module: str) -> None:
        parts = module.split(".")
        if parts[0] in DEPENDENCIES:
            found.extend((line, p) for p in parts if _private(p))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            root = node.module.split(".")[0]
            if root == "minigrpo":
                own_modules |= {a.asname or a.name for a in node.names}
            elif root in DEPENDENCIES:
                check_module(node.lineno, node.module)
                found += [(node.lineno, a.name) for a in node.names if _private(a.name)]
                dependency_names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                root = a.name.split(".")[0]
                if root == "minigrpo":
                    own_modules.add(a.asname or root)
                elif root in DEPENDENCIES:
                    check_module(node.lineno, a.name)
                    dependency_names.add(a.asname or root)
    # `self` in methods of classes deriving from a dependency's class is not minigrpo's alone
    borrowed_self = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_root(b) in dependency_names for b in node.bases):
            borrowed_self |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            own = (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                   and id(node) not in borrowed_self) or _root(node.value) in own_modules
            if not own:
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.keyword) and node.arg and _private(node.arg):
            found.append((node.value.lineno, node.arg))
        elif isinstance(node, ast.Subscript) and _private(_string(node.slice) or ""):
            found.append((node.lineno, _string(node.slice)))
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in ACCESSORS and len(node.args) >= 2 and _private(_string(node.args[1]) or ""):
                found.append((node.lineno, _string(node.args[1])))
            elif name == "attrgetter":
                found += [(node.lineno, _string(a)) for a in node.args if _private(_string(a) or "")]
            elif name == "import_module" and node.args and _string(node.args[0]):
                check_module(node.lineno, _string(node.args[0]))
    return sorted(found)


def test_the_scanner_finds_each_kind_of_private_use():
    source = ("from transformers.cache_utils import _private_helper, DynamicLayer\n"
              "import torch._dynamo\n"
              "from minigrpo import data\n"
              "x = model.config._attn_implementation\n"
              "y = getattr(cfg, '_attn_implementation', None)\n"
              "engine.coordinator._invalidate_trace()\n"
              "m = AutoModel.from_pretrained(p, _attn_implementation='eager')\n"
              "z = cfg.to_dict()['_commit_hash'] + operator.attrgetter('_k')(layer)\n"
              "w = importlib.import_module('transformers.utils._x')\n"
              "class Layer(DynamicLayer):\n"
              "    def f(self):\n"
              "        return self._len\n"
              "class Own:\n"
              "    def f(self):\n"
              "        return self._own + data._gold_final('') + obj.__class__.__name__ + nt._replace(a=1)\n")
    assert private_uses(source) == [(1, "_private_helper"), (2, "_dynamo"), (4, "_attn_implementation"),
                                    (5, "_attn_implementation"), (6, "_invalidate_trace"),
                                    (7, "_attn_implementation"), (8, "_commit_hash"), (8, "_k"), (9, "_x"),
                                    (12, "_len")]


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


@pytest.mark.vllm
def test_vllm_reaches_exist_on_the_installed_vllm():
    """compat's vLLM reaches, on the installed vLLM (in .venv-vllm: -m vllm): the worker method the push calls
    through LLM.collective_rpc, and the platform queries."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed (.venv-vllm: bash scripts/setup_vllm.sh)")
    from vllm import LLM  # the optional dependency, installed in .venv-vllm
    from vllm.v1.worker.cpu_worker import CPUWorker

    from minigrpo.compat import vllm_lora_rank, vllm_on_cpu, vllm_sleep_available

    assert "kwargs" in inspect.signature(LLM.collective_rpc).parameters
    assert callable(CPUWorker.reload_weights)  # the worker method vllm_push_weights names (inherited: gpu_worker)
    assert vllm_on_cpu() is True and vllm_sleep_available() is False  # the CPU build, as CI installs it
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 16, 17, 512)] == [1, 8, 8, 16, 32, 512]  # its MaxLoRARanks
    with pytest.raises(ConfigError, match="lora_r: 513.*vllm_lora_sync: merged"):
        vllm_lora_rank(513)


def test_adapter_switch_refuses_a_model_without_peft_layers(model_and_ids):
    """Reference.active's switch (compat.adapter_switch) on a model with no adapter layer it knows (a peft that
    renamed its switch would look the same) raises instead of leaving the adapters on: a KL of 0, silently."""
    from minigrpo.compat import adapter_switch

    model, _ = model_and_ids
    with pytest.raises(RuntimeError, match="adapter_switch"):
        adapter_switch(model)
