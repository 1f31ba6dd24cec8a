"""The chat template: the one layout of (prompt, response) that SFT training and generation share.

    bos <|user|> prompt <|end|> <|assistant|> response eos

Only the response and its eos carry loss: the model learns to answer and to stop, never to write prompts.

A Hugging Face tokenizer (hf:DIR) renders through its model's own Jinja chat template instead (llmjax's layout in
Jinja, hf_tokenizer.CHAT_TEMPLATE, when the folder has none), so a pretrained model is fine-tuned in the format
it already knows and the result chats through transformers' apply_chat_template. The template runs as
transformers runs it (a sandbox, trim_blocks and lstrip_blocks, raise_exception, bos_token and friends), but
without strftime_now: a template's date then falls back to its fixed default, and rows stay pure functions of
their seed.
"""

import functools
import os

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmjax.data.hf_tokenizer import HFTokenizer
from llmjax.data.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """What generation feeds the model, which then samples the response until eos."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode(_text(tokenizer, prompt, None))
    s = tokenizer.special_ids
    return [s["bos"], s["<|user|>"], *tokenizer.encode(prompt), s["<|end|>"], s["<|assistant|>"]]


def render(tokenizer: Tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[float]]:
    """Token ids and each token's loss weight as a target: 1 on the response and its eos, 0 elsewhere.

    A trainer feeding ids[:-1] to predict ids[1:] uses weights[1:] as its loss mask. Without a response this
    is the prompt part alone (all weights 0), an exact prefix of the full rendering.
    """
    ids = prompt_ids(tokenizer, prompt)
    weights = [0.0] * len(ids)
    if response is not None:
        answer, answer_weights = _answer(tokenizer, prompt, response)
        ids += answer
        weights += answer_weights
    return ids, weights


def _answer(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[float]]:
    """The response's ids and weights after prompt_ids.

    Through a Jinja template: the text the full conversation adds to the generation prompt, encoded on its own,
    so training sees exactly the ids generation feeds and then produces. The weights cover it up to the first eos
    (what the template puts after it, such as ChatML's newline, is never generated); a template that ends the
    turn without eos gets one, as the model must learn to stop.
    """
    if not isinstance(tokenizer, HFTokenizer):
        answer = tokenizer.encode(response, eos=True)
        return answer, [1.0] * len(answer)
    head, full = _text(tokenizer, prompt, None), _text(tokenizer, prompt, response)
    if not full.startswith(head):
        i = len(os.path.commonprefix([head, full]))
        raise ValueError(f"the chat template of {tokenizer.path} renders a generation prompt that is no prefix of the "
                         f"answered conversation (it goes on {head[i:i + 30]!r} where that has {full[i:i + 30]!r}), so "
                         "training and generation would disagree; use a template whose add_generation_prompt text "
                         "ends where the assistant's answer begins")
    answer = tokenizer.encode(full[len(head):])
    if tokenizer.eos_id not in answer:
        answer.append(tokenizer.eos_id)
    n = answer.index(tokenizer.eos_id) + 1
    return answer, [1.0] * n + [0.0] * (len(answer) - n)


def _text(tokenizer: HFTokenizer, prompt: str, response: str | None) -> str:
    """The conversation through the tokenizer's template: with the response, or ready for the model's answer."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    try:
        return _compile(tokenizer.chat_template).render(
            messages=messages, add_generation_prompt=response is None, tools=None, documents=None,
            **tokenizer.special_tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template of {tokenizer.path} fails: {e}") from None


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """Compiled once per template text, not once per rendered example."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    return env.from_string(source)
