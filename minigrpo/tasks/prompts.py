"""Prompts: the templates, and the one function that renders a dataset's examples as prompt texts.

Templates (`TEMPLATES`, the names `template:` accepts): "chat" and "r1" go through the tokenizer's chat
template with a system prompt asking for a final `#### <number>` line (GSM8K's own answer format, so one
extractor scores both the data and the model); "fewshot" is plain text for base models that have no chat
template; "auto" (the default) is "chat" when the tokenizer has a chat template, else "fewshot"
(`resolve_template`, called once at start). A template is added here (its name in TEMPLATES, its text in
`build_prompt`, its stop strings in STOP_STRINGS), nowhere else.

A raw (non-chat) prompt starts with the tokenizer's BOS when the tokenizer adds one by default (Gemma, Llama):
the prompts are tokenized without special tokens (a chat template writes its own BOS), and a base model
scores text without its BOS far worse (gemma-3-270m on a GSM8K solution: 1.81 nats per token, 1.39 with it).
"""

from typing import Any

from jinja2 import TemplateError

from minigrpo.errors import ConfigError, DataError
from minigrpo.tasks.sources import Example, sft_target

TEMPLATES = {"auto": "by the data: conversational prompts -> their messages through the chat template; a "
                     "'prompt' text -> 'raw' (TRL's standard format); a 'question' -> 'chat' when the tokenizer "
                     "has a chat template, else 'fewshot' (a base model)",
             "chat": "the tokenizer's chat template, asking for a final '#### N' line",
             "r1": "the chat template with R1's <think> ... </think> instruction",
             "fewshot": "plain 'Question: / Answer:' text with solved train examples first (base models)",
             "raw": "the prompt text as the data gives it, nothing added (BOS aside)"}
CHAT_TEMPLATES = ("chat", "r1")  # rendered by the tokenizer's chat template; the others are raw text

# Each template's stop strings (the config's `stop_strings: null`); a chat turn ends with EOS, which needs none.
# A base model on few-shot text goes on with the next shot: "\nQuestion:" starts it, so the completion ends there.
STOP_STRINGS: dict[str, list[str]] = {"fewshot": ["\nQuestion:"]}

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. Reason step by step, then write the final "
    "answer on its own last line in the form:\n#### <number>"
)

R1_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. First think about the problem step by step "
    "inside <think> ... </think>. Then give the final answer on its own last line in the form:\n"
    "#### <number>"
)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (an instruct model's does; a base model's usually not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _concrete(template: str, tokenizer: Any, model: str = "the model", examples: list[Example] | None = None) -> str:
    """`template` with "auto" resolved against the tokenizer and the data; a chat template asked of a tokenizer that
    has none is a ConfigError. Other names pass through (`build_prompt` rejects an unknown one)."""
    conversational = bool(examples) and examples[0].messages is not None
    if conversational and (template == "fewshot" or not has_chat_template(tokenizer)):
        raise ConfigError(f"template: conversational prompts (lists of messages) are rendered by the tokenizer's "
                          f"chat template; {model}'s tokenizer has none and template is {template!r}: give text "
                          f"prompts, or a model with a chat template")
    if template == "auto" and conversational:
        return "chat"
    if template == "auto" and examples and examples[0].field == "prompt":
        return "raw"  # TRL's standard format: the text as given
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "fewshot"
    if template in CHAT_TEMPLATES and not has_chat_template(tokenizer):
        raise ConfigError(f"template: {template!r} renders prompts with the tokenizer's chat template, and "
                          f"{model}'s tokenizer has no chat template (a base model?); use `template: fewshot`, "
                          f"or `template: auto` (the default), which picks fewshot for such a model")
    return template


def resolve_template(cfg: Any, tokenizer: Any, examples: list[Example] | None = None) -> str:
    """The template a run uses: `cfg.template` with "auto" resolved (TEMPLATES["auto"]: by the data's prompt column,
    then the tokenizer); "chat" / "r1" for a tokenizer without a chat template is a ConfigError naming `template`
    and the fix. Called once at start, right after loading the tokenizer and the data; the run's config then
    records the concrete name."""
    return _concrete(cfg.template, tokenizer, repr(cfg.model), examples)


def stop_strings(cfg: Any, tokenizer: Any = None) -> list[str]:
    """The strings that end a completion (SamplingParams.stop): `cfg.stop_strings`, or when that is null the
    template's default (STOP_STRINGS: "\\nQuestion:" for fewshot, none for the chat templates). The template must be
    concrete (`resolve_template` at start) unless `tokenizer` is given to resolve "auto"."""
    if cfg.stop_strings is not None:
        return list(cfg.stop_strings)
    template = cfg.template if tokenizer is None else resolve_template(cfg, tokenizer)
    if template == "auto":
        raise ValueError("stop_strings: template 'auto' is not resolved yet; call resolve_template(cfg, tokenizer) "
                         "at start (or pass the tokenizer)")
    return list(STOP_STRINGS.get(template, []))


def bos_prefix(tokenizer: Any) -> str:
    """The text a raw (non-chat) prompt must start with: the tokenizer's BOS when it adds one by default
    (`tokenizer("x")` begins with it: Gemma, Llama), else "". Prompts are tokenized without special tokens
    (rollout/types.py `encode_prompts`, sft.py), so a raw prompt carries its BOS as text, as a chat template does."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("x").input_ids
    return bos if ids and ids[0] == bos_id else ""


def _chat_prompt(tokenizer: Any, system: str, question: str, tools: list | None = None) -> str:
    """Render a system + user conversation with the tokenizer's chat template, ready for generation (`tools`: the
    functions the model may call, described by the template as it does)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        # Some templates (e.g. Gemma's) reject a system role; put the instructions in the user turn.
        messages = [{"role": "user", "content": f"{system}\n\n{question}"}]
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def _messages_prompt(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None,
                     tools: list | None = None) -> str:
    """A conversational prompt as given, through the chat template (`system_prompt` first, if set and the
    messages have no system turn)."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def build_prompt(
    tokenizer: Any,
    question: str,
    template: str = "chat",
    system_prompt: str | None = None,
    fewshot: list[Example] | None = None,
    messages: list[dict[str, str]] | None = None,
    tools: list | None = None,
) -> str:
    """Build the prompt text for one question.

    "chat": the chat template with SYSTEM_PROMPT (or `system_prompt`); "r1": the same with
    R1_SYSTEM_PROMPT (think in <think> tags); "fewshot": plain "Question: ...\\nAnswer: ..." blocks for
    the `fewshot` examples, then the question, for base models (`system_prompt`, if given, goes first);
    "auto": "chat" or "fewshot", as the tokenizer has a chat template or not. No BOS: `render_prompts` adds it.
    `tools` (functions) reach the chat template's `tools=`; raw text templates do not describe them.
    """
    if messages is not None:  # conversational: the conversation is the prompt, whatever the template's text
        return _messages_prompt(tokenizer, messages, system_prompt, tools)
    template = _concrete(template, tokenizer)
    if template == "raw":
        return f"{system_prompt}\n\n{question}" if system_prompt else question
    if template == "chat":
        return _chat_prompt(tokenizer, system_prompt or SYSTEM_PROMPT, question, tools)
    if template == "r1":
        return _chat_prompt(tokenizer, system_prompt or R1_SYSTEM_PROMPT, question, tools)
    if template == "fewshot":
        # The shots end with "#### N" so a base model copies the format the reward extracts.
        shots = "".join(f"Question: {ex.question}\nAnswer: {sft_target(ex)}\n\n" for ex in fewshot or [])
        header = f"{system_prompt}\n\n" if system_prompt else ""
        return f"{header}{shots}Question: {question}\nAnswer:"
    raise ConfigError(f"template: unknown {template!r}; choose one of {', '.join(TEMPLATES)}")


def render_prompts(cfg: Any, tokenizer: Any, examples: list[Example], fewshot: list[Example] | None = None,
                   where: str = "the data", check_length: bool = True) -> list[str]:
    """Prompt text for each example as the run's config renders it (template, system prompt, few-shot
    examples; a raw template's text starts with the BOS the tokenizer adds by default, `bos_prefix`); with
    check_length (training), a prompt over max_prompt_length tokens is an error naming the row."""
    template = resolve_template(cfg, tokenizer, examples)
    from minigrpo.agent.tools import load_tool  # here: the CLI imports this module (TEMPLATES) before it quiets the
    # libraries, and agent.tools imports transformers

    tools = [load_tool(t) for t in cfg.tools] or None
    if getattr(cfg, "environment", None):  # a bad name fails here, before the model loads, as a bad tool does
        from minigrpo.agent.env import load_environment  # here: as agent.tools above

        load_environment(cfg.environment)
    prompts = [build_prompt(tokenizer, ex.question, template, cfg.system_prompt, fewshot, ex.messages, tools)
               for ex in examples]
    if template not in CHAT_TEMPLATES and (bos := bos_prefix(tokenizer)):  # a chat template writes its own BOS
        prompts = [p if p.startswith(bos) or ex.messages is not None else bos + p for p, ex in zip(prompts, examples)]
    if not prompts or not check_length:
        return prompts
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    for i, n in enumerate(lengths):
        if n > cfg.max_prompt_length:
            raise DataError(f"{where} row {i + 1}: the prompt has {n} tokens > max_prompt_length="
                            f"{cfg.max_prompt_length}; raise max_prompt_length or remove the row")
    return prompts
