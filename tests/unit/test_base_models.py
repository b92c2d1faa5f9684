"""Base models (issue 16): a raw prompt gets the BOS its tokenizer adds by default (once), chat prompts and the
tiny tokenizers are unchanged, `template: auto` picks chat or fewshot, and each template's stop strings."""

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from minigrpo.config import Config, ConfigError, load_config
from minigrpo.model import load_tokenizer
from minigrpo.sft import encode_pairs
from minigrpo.tasks.prompts import TEMPLATES, bos_prefix, build_prompt, render_prompts, resolve_template, stop_strings
from minigrpo.tasks.sources import Example
from minigrpo.tiny import CHATML_TEMPLATE, arith_tokenizer, tiny_tokenizer

SHOT = Example("1+2?", "1 + 2 = 3.\n#### 3", {"question": "1+2?", "answer": "3"})
QUESTIONS = [Example("2+2?", "#### 4", {"answer": "4"}), Example("3+5?", "#### 8", {"answer": "8"})]


def bos_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The byte-level tiny tokenizer plus a <bos> it adds to every text, as Gemma's and Llama's do."""
    backend = tiny_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", chat_template=chat_template)


def test_the_test_tokenizer_adds_a_bos_and_the_tiny_ones_do_not():
    tok = bos_tokenizer()
    assert tok("x").input_ids == [tok.bos_token_id, tok.convert_tokens_to_ids("x")]
    assert bos_prefix(tok) == "<bos>"
    for tiny in (tiny_tokenizer(), arith_tokenizer(), load_tokenizer(Config(model="tiny-arith"))):
        assert bos_prefix(tiny) == ""


def test_fewshot_prompts_start_with_one_bos():
    tok = bos_tokenizer()
    prompts = render_prompts(Config(template="fewshot"), tok, QUESTIONS, [SHOT])
    assert prompts == ["<bos>Question: 1+2?\nAnswer: 1 + 2 = 3.\n#### 3\n\nQuestion: 2+2?\nAnswer:",
                       "<bos>Question: 1+2?\nAnswer: 1 + 2 = 3.\n#### 3\n\nQuestion: 3+5?\nAnswer:"]
    ids = tok(prompts, add_special_tokens=False).input_ids  # as the rollout backends encode prompts
    assert [row.count(tok.bos_token_id) for row in ids] == [1, 1] and ids[0][0] == tok.bos_token_id
    # Auto on a tokenizer without a chat template: the same fewshot prompts.
    assert render_prompts(Config(), tok, QUESTIONS, [SHOT]) == prompts


def test_a_prompt_already_starting_with_bos_is_not_given_another():
    tok = bos_tokenizer()
    prompts = render_prompts(Config(template="fewshot", system_prompt="<bos>Solve."), tok, QUESTIONS[:1])
    assert prompts == ["<bos>Solve.\n\nQuestion: 2+2?\nAnswer:"]
    assert tok(prompts, add_special_tokens=False).input_ids[0].count(tok.bos_token_id) == 1


def test_sft_pairs_hold_one_bos():
    """SFT tokenizes the rendered prompt and the target without special tokens: the BOS comes once, first."""
    tok = bos_tokenizer()
    prompts = render_prompts(Config(template="fewshot"), tok, QUESTIONS)
    (ids, trained), _ = encode_pairs(tok, prompts, ["#### 4", "#### 8"])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    prompt_len = len("Question: 2+2?\nAnswer:") + 1  # byte-level: one token per character, + the BOS
    assert trained == [0] * prompt_len + [1] * (len(ids) - prompt_len)
    assert ids[-1] == tok.eos_token_id


def test_chat_prompts_get_no_bos_from_us():
    """A chat template writes (or leaves out) its own BOS: the prompt is the template's text, as before."""
    tok = bos_tokenizer(CHATML_TEMPLATE)  # adds a BOS by default, the chat template has none
    prompts = render_prompts(Config(), tok, QUESTIONS)
    assert prompts == [build_prompt(tok, ex.question, "chat") for ex in QUESTIONS]
    assert prompts[0].startswith("<|im_start|>system\n")


def test_tiny_tokenizers_get_todays_prompts():
    """The embedded default's prompts are unchanged (auto resolves to chat): the default run stays bit-identical."""
    tok = load_tokenizer(Config(model="tiny-arith"))
    assert render_prompts(Config(), tok, QUESTIONS) == ["<|user|>2+2?<|assistant|>", "<|user|>3+5?<|assistant|>"]
    assert render_prompts(Config(template="fewshot"), tok, QUESTIONS[:1], [SHOT]) == [
        "Question: 1+2?\nAnswer: 1 + 2 = 3.\n#### 3\n\nQuestion: 2+2?\nAnswer:"]
    byte = tiny_tokenizer()
    assert render_prompts(Config(), byte, QUESTIONS[:1]) == [build_prompt(byte, "2+2?", "chat")]
    assert render_prompts(Config(template="fewshot"), byte, QUESTIONS[:1]) == ["Question: 2+2?\nAnswer:"]


def test_resolve_template():
    chat, base = tiny_tokenizer(), bos_tokenizer()
    assert "auto" in TEMPLATES and Config().template == "auto"
    assert resolve_template(Config(), chat) == "chat"
    assert resolve_template(Config(), base) == "fewshot"
    for name in ("chat", "r1", "fewshot"):
        assert resolve_template(Config(template=name), chat) == name
    assert resolve_template(Config(template="fewshot"), base) == "fewshot"
    for name in ("chat", "r1"):
        with pytest.raises(ConfigError, match=rf"template: '{name}'.*'tiny-arith''s tokenizer has no chat template"
                                              r".*`template: fewshot`"):
            resolve_template(Config(template=name), base)
    # build_prompt resolves auto too.
    assert build_prompt(base, "Q?", "auto") == "Question: Q?\nAnswer:"
    assert build_prompt(chat, "Q?", "auto") == build_prompt(chat, "Q?", "chat")


def test_stop_strings_per_template_and_config():
    assert stop_strings(Config(template="fewshot")) == ["\nQuestion:"]
    assert stop_strings(Config(template="chat")) == [] and stop_strings(Config(template="r1")) == []
    assert stop_strings(Config(template="fewshot", stop_strings=[])) == []  # []: none
    assert stop_strings(Config(template="chat", stop_strings=["\n\n"])) == ["\n\n"]
    assert stop_strings(Config(), bos_tokenizer()) == ["\nQuestion:"]  # auto resolved with the tokenizer
    assert stop_strings(Config(), tiny_tokenizer()) == []
    with pytest.raises(ValueError, match="resolve_template"):
        stop_strings(Config())  # auto, unresolved


def test_stop_strings_config_values():
    assert Config().stop_strings is None
    assert load_config(None, {"stop_strings": "Q:,###"}).stop_strings == ["Q:", "###"]
    assert load_config(None, {"stop_strings": "null"}).stop_strings is None
    assert load_config(None, {"stop_strings": ""}).stop_strings == []
    with pytest.raises(ConfigError, match="stop_strings: an empty string"):
        Config(stop_strings=["\nQuestion:", ""])
