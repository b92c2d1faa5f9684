"""Rewards that are models: a reward model (a sequence classifier, TRL's `reward_funcs="owner/model"`) and an LLM
judge (a generative model that scores a completion against a rubric: R1's "generative reward model").

Reward model: `reward_funcs: [owner/reward-model]` (a hub id or a local folder: any string with a `/` and no `:`).
It is loaded once with `AutoModelForSequenceClassification` and its own tokenizer, on the run's device and dtype,
in eval mode, never trained. Each sample is scored as the conversation (the question as the user's turn, the
completion as the assistant's) through the reward model's own chat template (prompt + completion as plain text
when it has none), in batches of 16, truncated to 1024 tokens; the reward is the first logit, raw (TRL's
convention: `logits[:, 0]`): its scale is the model's, which the group-relative advantages normalise away.

LLM judge: `reward_funcs: [judge]` with `judge_model` (a local model: hub id, folder, built-in name; or the model
name an OpenAI-compatible server serves at `judge_base_url`). The judge reads the rubric (`judge_rubric`: the
built-in `correct`, or a file) filled with the question, the completion's text and the reference answer (the
`answer` column, when there is one), answers greedily, and its last `Score: N` (N from 0 to 10) is the
reward, divided by 10; an answer with no such line, a timeout or a server error scores None (no
opinion: the sample is skipped for this reward, and counted in `judge.failures`). A local judge runs on
minigrpo's engine in batches; a server judge is called concurrently (`judge_concurrency` requests at once), each
with `judge_timeout` seconds and `judge_retries` retries (the OpenAI client's own), its key read from the
environment variable OPENAI_API_KEY (a local server needs none).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
from pathlib import Path
from typing import Any

from minigrpo.errors import ConfigError
from minigrpo.tasks.answers import text_of

RUBRICS = {
    "correct": (
        "You are grading an answer to a question. Judge whether the answer is correct and well reasoned{ref_note}.\n\n"
        "Question:\n{question}\n\n{reference_block}Answer:\n{answer}\n\n"
        "Reply with a short justification, then a last line of the form \"Score: N\" where N is an integer from 0 "
        "(wrong) to {scale} (fully correct)."),
}
SCORE_RE = re.compile(r"score\s*[:=]\s*\**\s*(-?[0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


def is_model_name(name: str) -> bool:
    """Whether a reward_funcs entry names a reward model (a hub id `owner/name` or a folder) rather than a
    built-in or `package.module:function`."""
    return ":" not in name and ("/" in name or Path(name).expanduser().is_dir())


@functools.cache
def load_reward_model(name: str, device: str = "cpu", dtype: str = "float32") -> RewardModel:
    """The reward model `name` (one instance per name, device and dtype in a process: evaluation and training
    share it)."""
    return RewardModel(name, device, dtype)


class RewardModel:
    """A sequence-classification reward model as a reward function (module docstring)."""

    slow = True  # score() runs it in a thread beside the other rewards
    batch_size = 16
    max_length = 1024

    def __init__(self, name: str, device: str = "cpu", dtype: str = "float32") -> None:
        import torch  # here: heavy, and only a reward model needs it in this module
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:  # not a folder or hub id transformers can load as a classifier
            raise ConfigError(f"reward_funcs: {name!r} is not a built-in reward, not 'package.module:function', and "
                              f"not a reward model that loads (a hub id or folder of a sequence-classification "
                              f"model): {e}") from None
        if self.tokenizer.pad_token is None:  # the classifier reads the last non-pad token: it needs a pad id
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # past max_length the question's start goes, never the answer
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.name, self.lock = name, threading.Lock()
        self.__name__ = name.rstrip("/").rsplit("/", 1)[-1]  # logged as train/rewards/<its last path part>

    def texts(self, prompts: list[Any], completions: list[Any], question: list[str] | None = None) -> list[str]:
        """What the reward model reads per sample: the conversation through its own chat template."""
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            asked = p if isinstance(p, list) else [{"role": "user", "content": question[i] if question else p}]
            messages = [*asked, {"role": "assistant", "content": text_of(c)}]
            if getattr(self.tokenizer, "chat_template", None):
                out.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                out.append("\n".join(m["content"] for m in messages))
        return out

    def __call__(self, prompts: list[Any], completions: list[Any], question: list[str] | None = None,
                 **kwargs: Any) -> list[float]:
        import torch  # as in __init__

        texts = self.texts(prompts, completions, question)
        values: list[float] = []
        with self.lock, torch.no_grad():  # one batch at a time (evaluation and training may share it)
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt", add_special_tokens=False)
                values += self.model(**batch.to(self.device)).logits[:, 0].float().tolist()
        return values


def rubric_text(rubric: str) -> str:
    """A rubric's template: a built-in name, or a file holding one (placeholders {question}, {answer},
    {reference}, {scale}, and {reference_block} / {ref_note}: the built-in's reference block and note, empty when
    the row has no reference)."""
    if rubric in RUBRICS:
        return RUBRICS[rubric]
    path = Path(rubric).expanduser()
    if not path.is_file():
        raise ConfigError(f"judge_rubric: {rubric!r} is neither a built-in rubric ({', '.join(RUBRICS)}) nor a file")
    text = path.read_text()
    try:
        text.format(question="", answer="", reference="", reference_block="", ref_note="", scale=10)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"judge_rubric {path}: a placeholder it uses is not one of {{question}}, {{answer}}, "
                          f"{{reference}}, {{reference_block}}, {{ref_note}}, {{scale}} (write {{{{ and }}}} for "
                          f"braces): {e!r}") from None
    return text


def fill_rubric(template: str, question: str, answer: str, reference: str | None, scale: float = 10.0) -> str:
    """A rubric's template (`rubric_text`) filled in for one sample: what the judge reads (and what a judge is
    fine-tuned on, as the demo's is).

    >>> fill_rubric("{question} {answer} = {reference}? 0-{scale}", "1 + 1", "#### 2", "2")
    '1 + 1 #### 2 = 2? 0-10'
    """
    block = f"Reference answer:\n{reference}\n\n" if reference is not None else ""
    return template.format(question=question, answer=answer, reference=reference or "", reference_block=block,
                           ref_note=" (a reference answer is given)" if reference is not None else "",
                           scale=int(scale) if float(scale).is_integer() else scale)


def load_judge(options: dict[str, Any]) -> Any:
    """The reward `judge` for a run's settings (`reward_options`): the local judge, or the server judge's async
    function; one per settings in a process (evaluation and training share it)."""
    keys = ("judge_model", "judge_rubric", "judge_base_url", "judge_pattern", "judge_max_tokens", "judge_concurrency",
            "judge_timeout", "judge_retries", "device", "dtype")
    return _judge(tuple((k, options.get(k)) for k in keys))


@functools.cache
def _judge(settings: tuple[tuple[str, Any], ...]) -> Any:
    options = {k: v for k, v in settings if v is not None}
    if not options.get("judge_model"):
        raise ConfigError("reward_funcs: judge needs judge_model (a local model, or the model a judge_base_url "
                          "server serves)")
    judge = Judge(options["judge_model"], options.get("judge_rubric", "correct"), options.get("judge_base_url"),
                  max_tokens=options.get("judge_max_tokens", 256), concurrency=options.get("judge_concurrency", 8),
                  timeout=options.get("judge_timeout", 60.0), retries=options.get("judge_retries", 2),
                  device=options.get("device", "cpu"), pattern=options.get("judge_pattern"),
                  dtype=options.get("dtype", "float32"))
    return judge.served if judge.base_url else judge


def parse_score(text: str, scale: float, pattern: re.Pattern = SCORE_RE) -> float | None:
    """The judge's last `Score: N` (`pattern`'s first group) as N / scale (clipped to [0, 1]), or None when it gave
    none.

    >>> parse_score("Clear and right.\\nScore: 8", 10), parse_score("no verdict", 10), parse_score("Score: 12", 10)
    (0.8, None, 1.0)
    """
    found = list(pattern.finditer(text))
    if not found:
        return None
    try:
        return min(1.0, max(0.0, float(found[-1].group(1)) / scale))
    except (ValueError, TypeError, IndexError):  # a pattern whose first group is not a number: no verdict
        return None


class Judge:
    """An LLM judge as a reward function (module docstring): `model` local (run on minigrpo's engine) or served at
    `base_url` (OpenAI-compatible, called with the `openai` client)."""

    slow = True  # a local judge runs in a thread beside the other rewards (a server judge is async: `served`)
    __name__ = "judge"

    def __init__(self, model: str, rubric: str = "correct", base_url: str | None = None, scale: float = 10.0,
                 max_tokens: int = 256, concurrency: int = 8, timeout: float = 60.0, retries: int = 2,
                 device: str = "cpu", batch_size: int = 16, pattern: str | None = None,
                 dtype: str = "float32") -> None:
        self.template, self.scale, self.max_tokens = rubric_text(rubric), scale, max_tokens
        try:
            self.pattern = re.compile(pattern, re.IGNORECASE) if pattern else SCORE_RE  # what a verdict looks like
        except re.error as e:
            raise ConfigError(f"judge_pattern: {pattern!r} is not a regular expression: {e}") from None
        if self.pattern.groups < 1:
            raise ConfigError(f"judge_pattern: {pattern!r} needs a group around the verdict's number, e.g. "
                              f"'Verdict: ([0-9]+)'")
        self.base_url, self.model_name, self.batch_size = base_url, model, batch_size
        self.failures = 0  # samples the judge gave no score for, so far
        self.outputs: list[str] = []  # the last batch's judge answers (for `minigrpo sample` and tests)
        self.lock = threading.Lock()
        if base_url:
            try:
                import openai  # optional: the judge extra (in the lock)
            except ImportError:
                raise ConfigError("judge_base_url needs the openai client: pip install openai") from None
            self.client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                             timeout=timeout, max_retries=retries)
            self.concurrency = concurrency
        else:
            from minigrpo.config import Config  # here: config imports this package's rewards lazily
            from minigrpo.model import load_model  # here: heavy (torch, transformers)

            self.model, self.tokenizer = load_model(Config(model=model, device=device, dtype=dtype))
            self.model.eval().requires_grad_(False)

    def prompts(self, questions: list[str], answers: list[str], references: list[str | None]) -> list[str]:
        """The rubric filled in per sample."""
        return [fill_rubric(self.template, q, a, ref, self.scale)
                for q, a, ref in zip(questions, answers, references, strict=True)]

    def _inputs(self, prompts: list[Any], completions: list[Any], question: list[str] | None,
                answer: list[str | None] | None) -> list[str]:
        questions = question or [text_of(p) for p in prompts]
        return self.prompts(questions, [text_of(c) for c in completions], answer or [None] * len(completions))

    def _scored(self, outputs: list[str | None]) -> list[float | None]:
        values = [parse_score(o, self.scale, self.pattern) if o is not None else None for o in outputs]
        self.failures += sum(v is None for v in values)
        self.outputs = [o or "" for o in outputs]
        return values

    def __call__(self, prompts: list[Any], completions: list[Any], question: list[str] | None = None,
                 answer: list[str | None] | None = None, **kwargs: Any) -> list[float | None]:
        """The local judge's scores (a server judge: `served`)."""
        return self._scored(self._local(self._inputs(prompts, completions, question, answer)))

    async def served(self, prompts: list[Any], completions: list[Any], question: list[str] | None = None,
                     answer: list[str | None] | None = None, **kwargs: Any) -> list[float | None]:
        """The server judge's scores: its requests concurrent, `concurrency` at a time."""
        semaphore = asyncio.Semaphore(self.concurrency)  # on the loop that awaits it (score()'s own)

        async def one(text: str) -> str | None:
            async with semaphore:
                try:
                    reply = await self.client.chat.completions.create(
                        model=self.model_name, messages=[{"role": "user", "content": text}],
                        max_tokens=self.max_tokens, temperature=0.0)
                    return reply.choices[0].message.content or ""
                except Exception:  # noqa: BLE001  (a failed request is no score, counted; never the run's end)
                    return None

        filled = self._inputs(prompts, completions, question, answer)
        return self._scored(list(await asyncio.gather(*(one(t) for t in filled))))

    def _local(self, filled: list[str]) -> list[str]:
        from minigrpo import rollout  # here: heavy, and only a local judge generates
        from minigrpo.rollout.types import SamplingParams
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": f}], tokenize=False,
                                                    add_generation_prompt=True) if chat else f for f in filled]
        greedy = SamplingParams(n=1, max_new_tokens=self.max_tokens, temperature=0.0)
        out: list[str] = []
        with self.lock:
            for i in range(0, len(texts), self.batch_size):
                out += rollout.generate("engine", self.model, self.tokenizer, texts[i:i + self.batch_size],
                                        greedy).completions
        return out
