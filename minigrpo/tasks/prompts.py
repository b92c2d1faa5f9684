"""Prompts: the templates, and the one function that renders a dataset's examples as prompt texts.

Three templates (`TEMPLATES`, the names `template:` accepts): "chat" and "r1" go through the tokenizer's chat
template with a system prompt asking for a final `#### <number>` line (GSM8K's own answer format, so one
extractor scores both the data and the model); "fewshot" is plain text for base models that have no chat
template. A template is added here (its name in TEMPLATES, its text in `build_prompt`), nowhere else.
"""

from typing import Any

from jinja2 import TemplateError

from minigrpo.errors import ConfigError, DataError
from minigrpo.tasks.sources import Example, sft_target

TEMPLATES = {"chat": "the tokenizer's chat template, asking for a final '#### N' line",
             "r1": "the chat template with R1's <think> ... </think> instruction",
             "fewshot": "plain 'Question: / Answer:' text with solved train examples first (base models)"}

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. Reason step by step, then write the final "
    "answer on its own last line in the form:\n#### <number>"
)

R1_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. First think about the problem step by step "
    "inside <think> ... </think>. Then give the final answer on its own last line in the form:\n"
    "#### <number>"
)


def _chat_prompt(tokenizer: Any, system: str, question: str) -> str:
    """Render a system + user conversation with the tokenizer's chat template, ready for generation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("template: the model's tokenizer has no chat template (a base model?); use "
                          "`template: fewshot` for base models")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        # Some templates (e.g. Gemma's) reject a system role; put the instructions in the user turn.
        messages = [{"role": "user", "content": f"{system}\n\n{question}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(
    tokenizer: Any,
    question: str,
    template: str = "chat",
    system_prompt: str | None = None,
    fewshot: list[Example] | None = None,
) -> str:
    """Build the prompt text for one question.

    "chat": the chat template with SYSTEM_PROMPT (or `system_prompt`); "r1": the same with
    R1_SYSTEM_PROMPT (think in <think> tags); "fewshot": plain "Question: ...\\nAnswer: ..." blocks for
    the `fewshot` examples, then the question, for base models (`system_prompt`, if given, goes first).
    """
    if template == "chat":
        return _chat_prompt(tokenizer, system_prompt or SYSTEM_PROMPT, question)
    if template == "r1":
        return _chat_prompt(tokenizer, system_prompt or R1_SYSTEM_PROMPT, question)
    if template == "fewshot":
        # The shots end with "#### N" so a base model copies the format the reward extracts.
        shots = "".join(f"Question: {ex.question}\nAnswer: {sft_target(ex)}\n\n" for ex in fewshot or [])
        header = f"{system_prompt}\n\n" if system_prompt else ""
        return f"{header}{shots}Question: {question}\nAnswer:"
    raise ConfigError(f"template: unknown {template!r}; choose one of {', '.join(TEMPLATES)}")


def render_prompts(cfg: Any, tokenizer: Any, examples: list[Example], fewshot: list[Example] | None = None,
                   where: str = "the data", check_length: bool = True) -> list[str]:
    """Prompt text for each example as the run's config renders it (template, system prompt, few-shot
    examples); with check_length (training), a prompt over max_prompt_length tokens is an error naming the row."""
    prompts = [build_prompt(tokenizer, ex.question, cfg.template, cfg.system_prompt, fewshot) for ex in examples]
    if not prompts or not check_length:
        return prompts
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    for i, n in enumerate(lengths):
        if n > cfg.max_prompt_length:
            raise DataError(f"{where} row {i + 1}: the prompt has {n} tokens > max_prompt_length="
                            f"{cfg.max_prompt_length}; raise max_prompt_length or remove the row")
    return prompts
