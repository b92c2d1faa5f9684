"""The HF rollout backend: masks, texts, groups; and training log-probs equal to the sampler's."""

import torch

from minigrpo.logprobs import policy_logprobs
from minigrpo.rollout.hf import hf_generate
from minigrpo.rollout.types import SamplingParams, encode_prompts
from minigrpo.tiny import tiny_model, tiny_tokenizer


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_rollout_shapes_groups_and_masks():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=1)
    torch.manual_seed(0)
    prompts = [_chat(tok, "1+1?"), _chat(tok, "a longer prompt, so padding is needed")]
    ro = hf_generate(model, tok, prompts, SamplingParams(n=3, max_new_tokens=12))
    assert ro.completion_ids.shape[0] == 6
    assert ro.prompts == [prompts[0]] * 3 + [prompts[1]] * 3  # the groups: prompt i's samples in rows 3i .. 3i+2
    assert ro.prompt_mask[:3, 0].tolist() == [0, 0, 0]  # the short prompt is left-padded
    lengths = ro.completion_mask.sum(1).long()
    for i in range(6):  # each text is the decoded masked-in tokens; a truncated one has no EOS
        ids = ro.completion_ids[i, : lengths[i]].tolist()
        assert ro.completions[i] == tok.decode(ids, skip_special_tokens=True)
        assert ro.truncated[i].item() == (tok.eos_token_id not in ids)


def test_policy_logprobs_match_generate_with_left_padding():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=2).eval()
    ids, mask = encode_prompts(tok, [_chat(tok, "hi"), _chat(tok, "what is 12 times 7?")], torch.device("cpu"))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    C = out.sequences.shape[1] - ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, C, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, out.sequences, full_mask, C, temperature=0.7)
    expected = (torch.stack(out.logits, 1) / 0.7).log_softmax(-1).gather(-1, out.sequences[:, -C:, None])[..., 0]
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)


def test_greedy_is_deterministic():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    greedy = SamplingParams(n=1, max_new_tokens=8, temperature=0.0)
    a = hf_generate(model, tok, [_chat(tok, "x")], greedy)
    b = hf_generate(model, tok, [_chat(tok, "x")], greedy)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_shared_prefix_logprobs_and_grads_equal_the_plain_path():
    """Each prompt computed once and its KV cache expanded to G rows: same log-probs, same gradients."""
    from minigrpo.rollout.engine import engine_generate

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=9)
    prompts = [_chat(tok, "short"), _chat(tok, "a much longer prompt than the first one")]
    torch.manual_seed(0)
    ro = engine_generate(model, tok, prompts, SamplingParams(n=3, max_new_tokens=10))
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    C, mask = ro.completion_ids.shape[1], ro.completion_mask
    model.train()
    plain, _ = policy_logprobs(model, ids, attention, C, 0.9)
    shared, _ = policy_logprobs(model, ids, attention, C, 0.9, group_size=3)
    torch.testing.assert_close(shared * mask, plain * mask, atol=1e-5, rtol=1e-5)
    params = list(model.parameters())
    g_plain = torch.autograd.grad((plain * mask).sum(), params)
    g_shared = torch.autograd.grad((shared * mask).sum(), params)
    for a, b in zip(g_plain, g_shared):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
