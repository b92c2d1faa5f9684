"""`minigrpo export` for peft users and the Hub: the exported adapter names a base that loads from anywhere
(`AutoPeftModelForCausalLM.from_pretrained(DIR)` gives the trained logits), a base no name loads is written
beside it, and `--push_to_hub` uploads the folder with a model card, refusing a base only this machine has.

The Hub is not reachable here and huggingface_hub ships no local stand-in server, so the upload tests record
what `HfApi.create_repo` / `upload_folder` are given (and the folder's files at that moment); one test points
the client at a closed local port to see a real client failure become a clear message."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from peft import AutoPeftModelForCausalLM

from minigrpo.cli import main
from minigrpo.config import Config, ConfigError
from minigrpo.model import ASSETS
from minigrpo.tools.export import export
from minigrpo.train import run_grpo


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    """A 2-step LoRA run on tiny-arith (a packaged local folder), checkpointed each step, evaluated on 4."""
    out = tmp_path_factory.mktemp("arith") / "run"
    cfg = Config(model="tiny-arith", use_peft=True, lora_r=4, num_generations=4, per_device_train_batch_size=16,
                 max_completion_length=32, learning_rate=2e-2, max_steps=2, eval_limit=4, save_steps=1,
                 output_dir=str(out))
    return run_grpo(cfg, show_progress=False)


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's create_repo / upload_folder replaced by recorders: their arguments, and the uploaded files."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        folder, config = Path(kw["folder_path"]), Path(kw["folder_path"]) / "adapter_config.json"
        calls.append(("upload_folder", kw["repo_id"], kw | {
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "card": ModelCard((folder / "README.md").read_text()),
            "config": json.loads(config.read_text()) if config.is_file() else None}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_adapter_names_its_local_base_by_absolute_path_and_autopeft_loads_it(arith_run, tmp_path, monkeypatch):
    out = export(arith_run.run_dir, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((ASSETS / "tiny-arith").resolve())
    assert not (out / "base").exists()  # a folder that loads as it is: named, not copied
    monkeypatch.chdir(tmp_path)  # loads from another folder too
    ids = arith_run.tokenizer(arith_run.train_prompts[:2], return_tensors="pt", padding=True).input_ids
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(arith_run.model, ids), atol=1e-5, rtol=1e-5)
    card = ModelCard((out / "README.md").read_text())
    assert card.data.library_name == "peft" and card.data.base_model is None  # no hub id to link to
    assert "eval/accuracy" in card.text and "| lora_r | `4` |" in card.text


def test_a_checkpoint_exports_without_its_trainer_state(arith_run, tmp_path):
    assert (arith_run.run_dir / "checkpoint-1" / "trainer_state.pt").is_file()
    out = export(arith_run.run_dir, tmp_path / "ckpt", checkpoint=1)
    assert not (out / "trainer_state.pt").exists() and (out / "adapter_model.safetensors").is_file()


def test_a_base_no_name_loads_is_written_beside_the_adapter(tiny_data, tmp_path):
    # tiny-random is built from a seed (like a GGUF, dequantized on load, no checkpoint holds those weights)
    run = run_grpo(Config(model="tiny-random", dataset=str(tiny_data), use_peft=True, num_generations=2,
                          per_device_train_batch_size=4, max_completion_length=4, max_steps=1, eval_limit=0,
                          learning_rate=1e-2, output_dir=str(tmp_path / "run")), show_progress=False)
    with torch.no_grad():  # non-zero adapters, so the comparison sees them
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    run.model.save_pretrained(run.run_dir / "adapter")
    assert main(["export", str(run.run_dir), "--out", str(tmp_path / "adapter"), "--base_out",
                 str(tmp_path / "seeded-base")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "seeded-base").resolve())
    ids = run.tokenizer(run.train_prompts[:2], return_tensors="pt", padding=True).input_ids
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(run.model, ids), atol=1e-5, rtol=1e-5)

    default = export(run.run_dir, tmp_path / "default")  # without --base_out: DIR/base
    assert json.loads((default / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((default / "base").resolve())
    assert (default / "base" / "config.json").is_file() and (default / "base" / "tokenizer_config.json").is_file()


def test_push_of_an_adapter_with_a_local_base_is_refused_before_anything(arith_run, tmp_path, hub_calls, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(arith_run.run_dir), "--out", str(out), "--push_to_hub", "me/arith-lora"]) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub me/arith-lora" in err and "--base HUB_ID" in err
    assert hub_calls == [] and not out.exists()  # nothing written, nothing uploaded

    gguf_run = tmp_path / "gguf-run"  # a run on the packaged GGUF (its config is all the refusal reads)
    shutil.copytree(arith_run.run_dir / "adapter", gguf_run / "adapter")
    config = yaml.safe_load((arith_run.run_dir / "config.yaml").read_text())
    (gguf_run / "config.yaml").write_text(yaml.safe_dump(config | {"model": "smollm2-135m",
                                                                   "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert main(["export", str(gguf_run), "--out", str(out), "--push_to_hub", "me/smol-lora"]) == 2
    assert "GGUF SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err and hub_calls == [] and not out.exists()


def test_push_of_an_adapter_uploads_it_with_a_card_naming_the_hub_base(arith_run, tmp_path, hub_calls, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(arith_run.run_dir), "--out", str(out), "--base", "org/arith-base",
                 "--push_to_hub", "me/arith-lora", "--private", "--commit_message", "first"]) == 0
    assert "pushed to the Hub: me/arith-lora" in capsys.readouterr().out
    (create, repo, create_kw), (upload, repo2, up) = hub_calls
    assert (create, repo, create_kw) == ("create_repo", "me/arith-lora",
                                         {"private": True, "exist_ok": True, "repo_type": "model"})
    assert (upload, repo2, up["folder_path"], up["commit_message"]) == ("upload_folder", "me/arith-lora", str(out),
                                                                        "first")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(up["files"])
    assert up["config"]["base_model_name_or_path"] == "org/arith-base"  # a hub id stays a hub id
    card = up["card"]
    assert card.data.base_model == "org/arith-base" and card.data.library_name == "peft"
    assert "grpo" in card.data.tags and 'AutoPeftModelForCausalLM.from_pretrained("me/arith-lora")' in card.text
    before, after = (json.loads((arith_run.run_dir / "summary.json").read_text())[k]["eval/accuracy"]
                     for k in ("before", "after"))
    assert f"| eval/accuracy | {before:.4g} | {after:.4g} |" in card.text


def test_push_of_a_merged_model_needs_no_hub_base(arith_run, tmp_path, hub_calls):
    export(arith_run.run_dir, tmp_path / "merged", merge=True, push_to_hub="me/arith-merged")
    (_, _, create_kw), (_, _, up) = hub_calls
    assert create_kw["private"] is False and up["commit_message"].startswith("minigrpo export of run")
    assert "model.safetensors" in up["files"] and up["config"] is None
    assert up["card"].data.library_name == "transformers" and up["card"].data.base_model is None


def test_a_hub_failure_names_the_repo_and_what_to_do(arith_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "merged"
    assert main(["export", str(arith_run.run_dir), "--out", str(out), "--merge", "--push_to_hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub me/x: the upload failed" in err and "hf upload me/x" in err and "HF_TOKEN" in err
    assert (out / "model.safetensors").is_file()  # the export itself is complete


def test_bad_base_and_hub_flags_are_config_errors(arith_run, tmp_path):
    with pytest.raises(ConfigError, match="neither a model folder here nor a hub id"):
        export(arith_run.run_dir, tmp_path / "a", base="./no/such/folder")
    with pytest.raises(ConfigError, match="not a hub repo id"):
        export(arith_run.run_dir, tmp_path / "b", push_to_hub="not a repo")
    with pytest.raises(ConfigError, match="--base_out: only for"):
        export(arith_run.run_dir, tmp_path / "c", merge=True, base_out=tmp_path / "base")
    assert main(["export", str(arith_run.run_dir), "--out", str(tmp_path / "d"), "--private"]) == 2
