"""`minigrpo export RUN_DIR --out DIR [--merge] [--checkpoint N]`: what a run trained, in the forms people load.

- LoRA, adapter only: adapter weights + adapter_config.json + tokenizer, for
  `peft.PeftModel.from_pretrained(base, DIR)`.
- `--merge` (or a full fine-tune): one standalone model: safetensors weights, config, generation config,
  tokenizer with its chat template, for `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and vLLM.
  A GGUF base is dequantized (to the run's dtype) on the way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from minigrpo.config import run_config
from minigrpo.errors import ConfigError


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


def export(run_dir: str | Path, out: str | Path, merge: bool = False, checkpoint: int | None = None) -> Path:
    """Write the run's policy to `out` (adapter only, or merged into a standalone model); returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml: not a minigrpo run folder")
    source = policy_dir(run_dir, checkpoint)
    is_adapter = (source / "adapter_config.json").is_file()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder")
    if is_adapter and not merge:
        shutil.copytree(source, out, dirs_exist_ok=True)  # adapter weights, adapter_config.json, tokenizer
        return out
    # here, not at the top: copying an adapter (above) needs no torch, which takes seconds to import
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigrpo.compat import drop_gguf_marker, peft_wrapping
    from minigrpo.model import DTYPES, load_model, load_tokenizer

    cfg = run_config(run_dir, use_peft=False, device="cpu", load_in_4bit=False)
    if is_adapter:
        base, tok = load_model(cfg)
        with peft_wrapping():
            model = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.dtype])
    if (source / "tokenizer_config.json").is_file():  # the tokenizer exactly as trained (pad token, template)
        tok = AutoTokenizer.from_pretrained(source)
    elif not is_adapter:
        tok = load_tokenizer(cfg)
    drop_gguf_marker(model)
    with torch.no_grad():
        model.save_pretrained(out)
    tok.save_pretrained(out)  # tokenizer files and the chat template
    return out
