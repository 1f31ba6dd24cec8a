"""Evaluation: held-out perplexity, and task accuracy by answering held-out prompts and checking the answers: the
synthetic tasks with their checkers, an RL run's prompt records (files: or tfds:) against their "answer" as the
`math` reward reads it. Greedy accuracy, and with `samples` > 1 also pass@k over that many answers sampled at
`temperature` per prompt (Chen et al. 2021's unbiased estimator). A long-range task's greedy accuracy is also
reported by the distance between what it asks for and the question (`accuracy/passkey_1024/d256-511`: keys ending
256 to 511 tokens before it), in octaves above 128: what a context extension changes. Used inside the training
loop (cfg.eval_every, eval_samples, eval_temperature) and standalone (llmjax/evaluate/__main__.py):

  python -m llmjax.evaluate --workdir=runs/demo [--format=chat] [--n=100] [--samples=16 --temperature=1.0]
"""

import math
from collections.abc import Callable

import jax
import numpy as np

from llmjax import losses, rewards, sampling
from llmjax.data import chat, mixture, prompts, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.models import transformer
from llmjax.sharding import Constrain, batch_sharding, no_constrain


def prompt_ids(tokenizer, prompt: str, fmt: str) -> list[int]:
    """A task prompt as the model was trained to see it: plain text after bos, or through the chat template."""
    return chat.prompt_ids(tokenizer, prompt) if fmt == "chat" else tokenizer.encode(prompt, bos=True)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k answers drawn without replacement from n, c of them correct, is correct:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1), as a product that never forms the binomials."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check(record: dict, response: str) -> bool | None:
    """Whether a response answers a prompt record: its task's checker, else its "answer" as the `math` reward
    compares them (the final \\boxed{} or number, else the whole response); None for a record with neither."""
    if "task" in record:
        return tasks.get(record["task"]).check(record["prompt"], response)
    if "answer" in record:
        return rewards.same_answer(rewards.extract_answer(response), record["answer"])
    return None


def bucket(distance: int) -> str:
    """The distance bucket a long-range prompt's accuracy is also reported under: d0-127, d128-255, d256-511, ..."""
    low = 0 if distance < 128 else 2 ** (distance.bit_length() - 1)
    return f"d{low}-{max(128, 2 * low) - 1}"


def _low(name: str) -> int:
    return int(name[1:].split("-")[0])


def _buckets(sets: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """Per set of a long-range task, each prompt's distance bucket."""
    out = {}
    for name, records in sets.items():
        task = tasks.get(records[0]["task"]) if records and "task" in records[0] else None
        if task is not None and task.distance is not None:
            out[name] = np.array([bucket(task.distance(r["prompt"])) for r in records])
    return out


def ks(samples: int) -> list[int]:
    """The k of pass@k reported for `samples` answers per prompt: powers of two below it, and itself."""
    return sorted({2 ** i for i in range(samples.bit_length()) if 2 ** i < samples} | {samples})


def _held_out_rows(cfg, sharding, batches: int, on_prompts: bool) -> dict[str, list[dict]]:
    """Rows whose perplexity is reported, by source ("" for a run of one): held-out synthetic documents, or a
    files or tfds source's validation split; none for a source of prompt records (there is nothing to predict)."""
    if on_prompts and cfg.data.source != "synthetic":
        return {}
    try:
        return mixture.held_out(cfg, sharding, batches)
    except LlmjaxError:
        raise
    except ValueError as e:
        raise LlmjaxError(f"data.source={cfg.data.source!r} has no usable validation split ({e}); raise "
                          "--config.data.validation or set --config.eval_every=0") from None


def make_evaluator(cfg, mesh, constrain: Constrain = no_constrain, n: int = 64, batches: int = 4,
                   fmt: str | None = None, samples: int | None = None, temperature: float | None = None,
                   on_prompts: bool = False) -> Callable[[transformer.Params], dict[str, float]]:
    """fn(params) -> {perplexity, accuracy, accuracy/<set>[/<bucket>], pass@k, pass@k/<set>} on held-out data,
    compiled once (buckets: a long-range task's distances).
    Sets: each synthetic task (for synthetic sources and objectives whose data are prompts, `on_prompts`: RL) and
    such an objective's own prompt source. Another files or tfds source: the perplexity of its validation split
    alone (the checkers only know the tasks). A mixture: the perplexity of each source (perplexity/<source>) and of
    all of them, and its synthetic sources' tasks."""
    if fmt and fmt != cfg.data.format:
        cfg = cfg.copy_and_resolve_references()
        cfg.data.format = fmt
    fmt = cfg.data.format
    samples = cfg.eval_samples if samples is None else samples
    temperature = cfg.eval_temperature if temperature is None else temperature
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    sharding = batch_sharding(mesh, cfg.rules)
    rows = _held_out_rows(cfg, sharding, batches, on_prompts)

    def summed_ce(params, b):
        logits = transformer.forward(params, b["inputs"], b["positions"], b["segment_ids"], cfg.model, constrain)[0]
        return losses.cross_entropy(logits, b["targets"], b["loss_mask"], normalizer=1.0)[0]

    loss = jax.jit(summed_ce)
    asked = cfg if on_prompts else mixture.synthetic_view(cfg)
    sets = prompts.held_out(asked, n) if asked is not None else {}
    examples = [(name, record) for name, records in sets.items() for record in records]
    buckets = _buckets(sets)
    ids, lengths = sampling.left_pad([prompt_ids(tokenizer, r["prompt"], fmt) for _, r in examples] or [[0]])
    settings = dict(max_new_tokens=32, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    vocab_size=tokenizer.vocab_size, constrain=constrain)
    greedy = sampling.sampler(cfg.model, **settings)
    sample = sampling.sampler(cfg.model, temperature=temperature, **settings) if samples > 1 else None

    def answers(generate, params, repeat: int) -> list[str]:
        out = jax.device_get(generate(params, np.repeat(ids, repeat, 0), np.repeat(lengths, repeat),
                                      jax.random.key(0)))
        return [tokenizer.decode(t[:m]) for t, m in zip(out["tokens"], out["lengths"], strict=True)]

    def scored(responses: list[str], repeat: int) -> dict[str, np.ndarray]:
        """Per set, [prompts, repeat] correctness, for the sets whose records can be checked."""
        out = {}
        for name, records in sets.items():
            first = next(i for i, (s, _) in enumerate(examples) if s == name)
            marks = [check(r, responses[(first + i) * repeat + j]) for i, r in enumerate(records)
                     for j in range(repeat)]
            if records and None not in marks:
                out[name] = np.array(marks, bool).reshape(len(records), repeat)
        return out

    # Rows that score no token (chat documents longer than seq_len: a long-range task asked at more tokens than the
    # run's rows hold) have no perplexity.
    counts = {name: sum(float(b["loss_mask"].sum()) for b in batches) for name, batches in rows.items()}
    counted = [name for name, count in counts.items() if count]

    def evaluate(params) -> dict[str, float]:
        metrics = {}
        if counted:
            nats = {name: sum(float(loss(params, b)) for b in rows[name]) for name in counted}
            metrics["perplexity"] = math.exp(sum(nats.values()) / sum(counts[name] for name in counted))
            metrics |= {f"perplexity/{name}": math.exp(nats[name] / counts[name]) for name in counted if name}
        if not examples:
            return metrics
        correct = scored(answers(greedy, params, 1), 1)
        if correct:
            metrics["accuracy"] = float(np.mean(np.concatenate(list(correct.values()))))
            metrics |= {f"accuracy/{name}": float(c.mean()) for name, c in correct.items()}
            metrics |= {f"accuracy/{name}/{b}": float(correct[name][buckets[name] == b].mean())
                        for name in buckets if name in correct for b in sorted(set(buckets[name]), key=_low)}
        if sample is not None:
            passed = scored(answers(sample, params, samples), samples)
            for k in ks(samples) if passed else ():
                per_set = {name: [pass_at_k(samples, int(c.sum()), k) for c in marks] for name, marks in passed.items()}
                metrics[f"pass@{k}"] = float(np.mean(sum(per_set.values(), [])))
                metrics |= {f"pass@{k}/{name}": float(np.mean(v)) for name, v in per_set.items()}
        return metrics

    return evaluate
