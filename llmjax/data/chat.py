"""The chat template: the one layout of (prompt, response) that SFT training and generation share.

    bos <|user|> prompt <|end|> <|assistant|> response eos

Only the response and its eos carry loss: the model learns to answer and to stop, never to write prompts.
"""

from llmjax.data.tokenizer import ByteTokenizer


def prompt_ids(tokenizer: ByteTokenizer, prompt: str) -> list[int]:
    """What generation feeds the model, which then samples the response until eos."""
    s = tokenizer.special_ids
    return [s["bos"], s["<|user|>"], *tokenizer.encode(prompt), s["<|end|>"], s["<|assistant|>"]]


def render(tokenizer: ByteTokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[float]]:
    """Token ids and each token's loss weight as a target: 1 on the response and its eos, 0 elsewhere.

    A trainer feeding ids[:-1] to predict ids[1:] uses weights[1:] as its loss mask. Without a response this
    is the prompt part alone (all weights 0), an exact prefix of the full rendering.
    """
    ids = prompt_ids(tokenizer, prompt)
    weights = [0.0] * len(ids)
    if response is not None:
        answer = tokenizer.encode(response, eos=True)
        ids += answer
        weights += [1.0] * len(answer)
    return ids, weights
