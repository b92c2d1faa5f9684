"""`minigrpo export RUN_DIR --out DIR [--merge] [--checkpoint N] [--base NAME] [--push_to_hub REPO_ID]`: what a
run trained, in the forms people load, on disk and on the Hugging Face Hub.

- LoRA, adapter only: adapter weights + adapter_config.json + tokenizer + a README.md model card, for
  `peft.AutoPeftModelForCausalLM.from_pretrained(DIR)` (what TRL and peft users reach for first: it loads the
  base named in adapter_config.json's `base_model_name_or_path`, then the adapter) and
  `peft.PeftModel.from_pretrained(base, DIR)`.
- `--merge` (or a full fine-tune): one standalone model: safetensors weights, config, generation config,
  tokenizer with its chat template, model card, for `transformers.AutoModelForCausalLM.from_pretrained(DIR)`
  and vLLM. A GGUF base is dequantized (to the run's dtype) on the way.

The base an adapter names is one that loads, anywhere (peft resolves a relative name against the current
folder, not the adapter's, so a name saved at training time can break):
- a hub id: kept as is (what TRL's `save_model` / `push_to_hub` write, and the Hub links to);
- a local model folder: its absolute path;
- a base no name alone loads (a GGUF, dequantized on load: weights no checkpoint holds; a model built from a
  seed): the base the adapter was trained on is written as a plain model (the run's dtype, its tokenizer) to
  DIR/base (or `--base_out`) and named by absolute path. Moving DIR then means loading the base yourself
  (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR)`);
- `--base NAME` names another base instead (a hub id to push with): for a GGUF run, the original weights the
  GGUF was quantized from are not the dequantized ones it trained on, so outputs differ a little.

`--push_to_hub REPO_ID` uploads DIR with huggingface_hub (token: HF_TOKEN, else `hf auth login`'s). A pushed
adapter must name a hub base (the Hub links `base_model:` to it, and nobody else has your folder): a local base
is refused before anything is written. The model card carries the front matter the Hub reads (`base_model`,
`library_name: peft` for an adapter), the run's key settings and its before/after accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigrpo.checkpoint import SHARDS_DIR, STATE
from minigrpo.compat import drop_gguf_marker, peft_wrapping
from minigrpo.config import Config, check_out_path, run_config
from minigrpo.errors import ConfigError
from minigrpo.model import DTYPES, RANDOM_INITS, load_model, load_tokenizer, resolve_model_path

CARD_SETTINGS = ["model", "gguf_file", "dtype", "dataset", "template", "reward_funcs", "reward_weights", "loss_type",
                 "loss_mode", "adv_estimator", "num_generations", "max_completion_length", "temperature", "beta",
                 "epsilon", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                 "use_peft", "lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit", "seed"]


def policy_dir(run_dir: Path, checkpoint: int | None = None) -> Path:
    """The folder holding the run's trained policy: `checkpoint-N/`, else `adapter/` or `model/`."""
    if checkpoint is not None:
        path = run_dir / f"checkpoint-{checkpoint}"
        if not path.is_dir():
            found = sorted(p.name for p in run_dir.glob("checkpoint-*"))
            raise ConfigError(f"--checkpoint {checkpoint}: no {path}; this run has {found or 'no checkpoints'}")
        return path
    for name in ("adapter", "model"):
        if (run_dir / name).is_dir():
            return run_dir / name
    raise ConfigError(f"{run_dir}: no adapter/ or model/ folder: not a finished minigrpo run (give --checkpoint N "
                      f"for one of its checkpoints)")


def _hub_id(name: str) -> bool:
    """Whether `name` is spelled as a Hub repo id (`owner/name` or `name`); says nothing of its existence."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def named_base(base: str) -> tuple[str, bool]:
    """A `--base` name -> (the name adapter_config.json gets, whether it is a hub id)."""
    if Path(base).is_dir():
        if not (Path(base) / "config.json").is_file():
            raise ConfigError(f"--base {base}: a folder without config.json: not a model transformers loads")
        return str(Path(base).resolve()), False
    if not _hub_id(base):
        raise ConfigError(f"--base {base!r}: neither a model folder here nor a hub id (owner/name)")
    return base, True


def trained_base(cfg: Config) -> tuple[str | None, bool]:
    """The base the run trained on as `AutoModelForCausalLM.from_pretrained(name)` loads it -> (name, whether it
    is a hub id); name None when no name alone loads it (a GGUF, a model built from a seed): it must be written."""
    if cfg.gguf_file or cfg.model in RANDOM_INITS:
        return None, False
    path = Path(resolve_model_path(cfg.model))
    if path.is_dir():
        return (str(path.resolve()), False) if (path / "config.json").is_file() else (None, False)
    if not _hub_id(cfg.model):  # a relative path is read from the folder the run was started in
        raise ConfigError(f"the run's model {cfg.model!r} is not a folder from here, nor a hub id: run export from "
                          f"the folder training ran in, or name the base with --base PATH_OR_HUB_ID")
    return cfg.model, True


def _save(model: Any, tok: Any, path: Path) -> None:
    drop_gguf_marker(model)  # a GGUF base holds dequantized weights: saved as a plain model
    with torch.no_grad():
        model.save_pretrained(path)
    tok.save_pretrained(path)  # tokenizer files and the chat template


def _tokenizer(source: Path, fallback: Any) -> Any:
    """The tokenizer exactly as trained (pad token, template) when the policy folder holds it."""
    return AutoTokenizer.from_pretrained(source) if (source / "tokenizer_config.json").is_file() else fallback


def write_base(cfg: Config, source: Path, dest: Path) -> str:
    """Write the base the adapter in `source` was trained on (a GGUF dequantized to the run's dtype, or a seeded
    init) as a plain model folder with the run's tokenizer; returns its absolute path."""
    model, tok = load_model(cfg)
    _save(model, _tokenizer(source, tok), dest)
    return str(dest.resolve())


def model_card(run_dir: Path, trained: Config, *, adapter: bool, base: str | None, base_is_hub: bool,
               base_written: bool, where: str, checkpoint: int | None) -> str:
    """README.md for the export: the Hub's front matter, how to load it, the base, settings, before/after."""
    data = ModelCardData(base_model=base if base_is_hub else None, library_name="peft" if adapter else "transformers",
                         pipeline_tag="text-generation", tags=["minigrpo", "grpo"] + (["lora"] if adapter else []))
    what = "A LoRA adapter" if adapter else "A model"
    lines = ["---", data.to_yaml(), "---", "", f"# {where.rstrip('/').split('/')[-1]}", "",
             f"{what} trained with GRPO (group-relative policy optimization, verifiable rewards) by minigrpo, "
             f"from run `{run_dir.name}`" + (f", checkpoint {checkpoint}" if checkpoint is not None else "") + ".", ""]
    if trained.gguf_file:
        note = ""
        if base_written:
            note = f" That base is saved as a plain model in `{base}`, the folder adapter_config.json names."
        elif adapter and base:
            note = (f" The base named here, `{base}`, does not hold those dequantized weights: outputs differ a "
                    f"little from the trained policy's.")
        lines += [f"Trained on the weights of `{trained.gguf_file}` (from `{trained.model}`), dequantized to "
                  f"{trained.dtype}.{note}", ""]
    elif base:
        lines += [f"Base model: `{base}`.", ""]
    lines += ["## Use", "", "```python"]
    if adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")  # the base, then the adapter']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")']
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
              "Prompts were " + ("rendered with the tokenizer's chat template." if trained.template == "chat"
                                 else f"in minigrpo's `{trained.template}` format."), "",
              "## Training settings", "", "| key | value |", "|---|---|"]
    values = trained.to_dict()
    lines += [f"| {key} | `{values[key]}` |" for key in CARD_SETTINGS if values.get(key) is not None]
    summary = run_dir / "summary.json"
    figures = json.loads(summary.read_text()) if summary.is_file() else {}
    before, after = figures.get("before") or {}, figures.get("after") or {}
    if before or after:
        lines += ["", "## Held-out evaluation (greedy)", "", "| metric | before | after |", "|---|---|---|"]
        for key in dict.fromkeys([*before, *after]):
            cell = [f"{d[key]:.4g}" if isinstance(d.get(key), float) else str(d.get(key, "-")) for d in (before, after)]
            lines.append(f"| {key} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines) + "\n"


def push(folder: Path, repo_id: str, private: bool, commit_message: str) -> None:
    """Upload `folder` to the model repo `repo_id` (made if missing); a Hub failure becomes a ConfigError."""
    api = HfApi()  # the token as huggingface_hub finds it: HF_TOKEN, else the one `hf auth login` stored
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except Exception as e:  # noqa: BLE001 - hub errors come as OSError, ValueError or the HTTP client's own types
        raise ConfigError(f"--push_to_hub {repo_id}: the upload failed ({type(e).__name__}: {e}). The export is "
                          f"complete in {folder}. Check the network, a token with write access to "
                          f"{repo_id.split('/')[0] if '/' in repo_id else 'your account'} (HF_TOKEN, or `hf auth "
                          f"login`) and that the repo id is yours; then upload it with `hf upload {repo_id} "
                          f"{folder}`") from None


def export(run_dir: str | Path, out: str | Path, merge: bool = False, checkpoint: int | None = None,
           base: str | None = None, push_to_hub: str | None = None, private: bool = False,
           base_out: str | Path | None = None, commit_message: str | None = None) -> Path:
    """Write the run's policy to `out` (adapter only, or merged into a standalone model) with a model card,
    and upload it to the Hub repo `push_to_hub` when given; returns `out`.

    base: the base the adapter names (hub id or model folder) instead of the one it was trained on; base_out:
    where a base no name loads (GGUF, seeded init) is written, default out/base."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {run_dir}: no such folder; give the folder of a minigrpo run")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR {run_dir}: no config.yaml: not a minigrpo run folder")
    source = policy_dir(run_dir, checkpoint)
    is_adapter = (source / "adapter_config.json").is_file()
    adapter_only = is_adapter and not merge
    check_out_path("--out", out, folder=True)  # a new (or empty) folder where this process may write
    if push_to_hub is not None and not _hub_id(push_to_hub):
        raise ConfigError(f"--push_to_hub {push_to_hub!r}: not a hub repo id (owner/name)")
    trained = run_config(run_dir)
    cfg = dataclasses.replace(trained, use_peft=False, device="cpu", load_in_4bit=False)

    # the base, settled before any work: a refusal leaves nothing behind
    if base_out is not None and (not adapter_only or base is not None):
        raise ConfigError("--base_out: only for an adapter export whose base is written out (not with --merge, "
                          "a full fine-tune or --base)")
    if base is not None:
        base_name, base_is_hub = named_base(base)
    elif adapter_only:
        base_name, base_is_hub = trained_base(cfg)
    else:  # a standalone model loads without its base: only the model card names it, when it can
        try:
            base_name, base_is_hub = trained_base(cfg)
        except ConfigError:
            base_name, base_is_hub = cfg.model, False
    if adapter_only and push_to_hub is not None and not base_is_hub:
        local = base_name or f"{cfg.model}" + (f" (GGUF {cfg.gguf_file}, dequantized on load)" if cfg.gguf_file
                                               else " (no name alone loads it)")
        raise ConfigError(f"--push_to_hub {push_to_hub}: the adapter's base is {local}, local to this machine: pass "
                          f"--base HUB_ID, the hub model it should load on (for a GGUF run, the model the GGUF was "
                          f"made from; the adapter was trained on the dequantized weights)")
    base_dir = Path(base_out) if base_out is not None else out / "base"
    if adapter_only and base_name is None:
        check_out_path("--base_out" if base_out is not None else "--out", base_dir, folder=True)

    written = False
    if adapter_only:
        # adapter weights, adapter_config.json, tokenizer; not a checkpoint's optimizer / RNG state or shards
        shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STATE, SHARDS_DIR, "engine"))
        if written := base_name is None:
            base_name = write_base(cfg, source, base_dir)
        config_path = out / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = base_name
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    else:
        if is_adapter:
            model, tok = load_model(cfg)
            with peft_wrapping():
                model = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
        else:
            model, tok = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.dtype]), None
        tok = _tokenizer(source, tok)
        _save(model, load_tokenizer(cfg) if tok is None else tok, out)

    where = push_to_hub or str(out.resolve())
    (out / "README.md").write_text(model_card(run_dir, trained, adapter=adapter_only, base=base_name,
                                              base_is_hub=base_is_hub, base_written=written, where=where,
                                              checkpoint=checkpoint))
    if push_to_hub is not None:
        push(out, push_to_hub, private, commit_message or f"minigrpo export of run {run_dir.name}"
             + (f", checkpoint {checkpoint}" if checkpoint is not None else ""))
    return out
