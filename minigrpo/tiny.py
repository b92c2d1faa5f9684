"""A tiny random Llama with a byte-level tokenizer and a ChatML template, built offline in a second.

It exists so that tests, the debug recipe and CI can run the whole pipeline with no download: the
model is random (it will not solve anything), but every code path (chat template, pad/eos handling,
LoRA, generation, the loss) is the one a real model takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from minigrpo.tasks.arith import SPLIT_PATTERN, TOOL_WORDS, arith_vocab

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) plus ChatML specials; eos = <|im_end|> = pad."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    # pad == eos on purpose: it is the common real-world case and the one that breaks naive masks.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token=None, unk_token=None, chat_template=CHATML_TEMPLATE)


def small_llama(tokenizer: PreTrainedTokenizerFast, seed: int, hidden: int, layers: int, intermediate: int,
                kv_heads: int, max_positions: int) -> LlamaForCausalLM:
    """A seeded random Llama with 4 attention heads and tied embeddings, eos = pad from the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 64, layers: int = 2,
               ) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for fast CPU tests (~0.1M parameters at the defaults)."""
    return small_llama(tokenizer, seed, hidden, layers, 2 * hidden, kv_heads=2, max_positions=2048)


# ---- the embedded default: a small Llama for the built-in arithmetic task ------------------------------------

ARITH_SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
# No system turn: the tiny model never learned to read instructions, and short prompts keep it fast.
ARITH_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def arith_tokenizer(tools: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the arithmetic task's vocabulary; digits are single tokens; eos = pad.
    tools=True: the tools model's (`arith_tools_tokenizer`)."""
    specials = ARITH_SPECIALS + (["<|tool|>"] if tools else [])
    # The tools' words come after the arith vocabulary: the shipped model's ids unchanged, so it can grow into the
    # tools model (its embedding matrix extended by rows).
    words = ARITH_SPECIALS + arith_vocab() + (["<|tool|>"] + TOOL_WORDS if tools else [])
    vocab = {t: i for i, t in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces carry their own spaces: concatenation is the exact inverse
    tok.add_special_tokens(specials)
    if tools:  # matched before the split: one token each, and kept in decoded text (not special)
        tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in TOOL_WORDS[:2]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=ARITH_TOOLS_TEMPLATE if tools else ARITH_TEMPLATE)


# The tools model's template: a tool's answer follows the assistant turn that called it as "<|tool|> ANSWER", then
# the next assistant turn (the `tools=` the template is given are not described: the model learned its one tool).
# The space makes a number's digits the very tokens of "#### ANSWER" (" 1", "0", ...): copying it is a fixed offset.
ARITH_TOOLS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>"
    "{% elif m['role'] == 'tool' %}<|tool|> {{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def arith_tools_tokenizer() -> PreTrainedTokenizerFast:
    """The arith tokenizer plus the calculator's words and a tool role (<|tool|>): the tools model's."""
    return arith_tokenizer(tools=True)


def arith_tools_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """The tools model's starting point: the shipped tiny-arith (it reads the problems and copies their numbers
    into worked solutions; a random init had not learned to copy 3-digit numbers after 800 SFT steps) grown by the
    tools' words. Their ids come after its vocabulary, so its ids are unchanged; the new rows of its (tied)
    embedding are the mean of the old ones (transformers' mean resizing, which falls back to the mean when the
    embeddings' covariance is singular, as here: no randomness, `seed` unused), so the next-token distribution
    barely moves; SFT then tells the new words apart."""
    model = LlamaForCausalLM.from_pretrained(Path(__file__).parent / "assets" / "tiny-arith")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its note on mean resizing is advice for someone resizing by hand
    try:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def arith_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 192, layers: int = 4,
                ) -> LlamaForCausalLM:
    """The embedded default's architecture, randomly initialised (~1.8M parameters)."""
    return small_llama(tokenizer, seed, hidden, layers, hidden * 8 // 3, kv_heads=4, max_positions=512)
