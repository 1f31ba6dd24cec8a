"""Rejection sampling (best-of-N, the Llama 2 / Llama 3 recipe): N responses per prompt from a policy, each scored by
a reward model, the synthetic tasks' checkers or any reward llmjax.rewards reads, the best kept and written as SFT
records, so that fine-tuning on them distils the policy's own best answers back into it:

  python -m llmjax.rejection_sample --policy=runs/sft --reward=runs/rm --n=8 --num_prompts=256 --out=best.jsonl
  python -m llmjax.rejection_sample --policy=runs/sft --reward=tasks --prompts=prompts.jsonl --min_score=1 \\
      --out=best.jsonl
  python -m llmjax.rejection_sample --policy=runs/sft_math --reward=math --prompts=problems.jsonl --min_score=1 \\
      --out=best.jsonl
  python -m llmjax.main --config=configs/sft.py --config.init_from=runs/sft --config.data.source=files:best.jsonl \\
      --workdir=runs/sft_rs

Prompts are `synthetic` (drawn from the policy run's data.tasks) or a .jsonl file of {"prompt", ...} records whose
other fields the reward reads (a word problem's "answer" for `math`); they go through the chat template. --reward is
a reward model run or a spec of llmjax.rewards (tasks, math, exact, format:REGEX, module:function, weighted sums
such as 'math,format:^\\d+$:0.1'). Each output line is {"prompt", "response", "score"}. A response the policy
did not end with eos within --max_new_tokens (it would teach the model to stop mid-answer) is never kept. The summary
(mean score of one sample against the best of N; with task prompts, the accuracy of one sample, of the chosen one and
of the best possible choice) is printed and written to OUT.summary.json (best.summary.json for --out=best.jsonl),
last: the files are each written whole (a temporary name, then renamed), so a summary means all of them are there.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from tqdm import tqdm

from llmjax import rewards, runs, sampling
from llmjax.cli import run_main
from llmjax.data import chat, tasks
from llmjax.data import prompts as prompt_records
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.models import transformer
from llmjax.score import Scorer
from llmjax.sharding import Constrain, make_constrain, make_mesh, no_constrain

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (prompts, responses) -> scores
PROMPT_STREAM = 2_000_003  # offsets the seed: these prompts are neither training nor evaluate's held-out stream


def task_of(prompt: str) -> tasks.Task | None:
    """The synthetic task a prompt was drawn from, or None for any other text."""
    try:
        task = tasks.get(prompt.split(" ", 1)[0])
        task.check(prompt, "")  # parses the prompt
    except (ValueError, KeyError):  # no task's name (an LlmjaxError), or the name but not its prompt format
        return None
    return task


def check_tasks(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """The tasks' checkers as a reward: 1.0 for a correct answer, 0.0 for a wrong one."""
    out = np.zeros(len(prompts), np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        task = task_of(prompt)
        if task is None:
            raise LlmjaxError(f"prompt {prompt!r} is not a synthetic task prompt, so --reward=tasks cannot check it; "
                              "score with a reward model run (--reward=runs/rm)")
        out[i] = task.check(prompt, response)
    return out


def synthetic_records(task_names: str, num: int, seed: int = 0) -> list[dict]:
    """`num` prompt records {"prompt", "answer", "task"} of the comma-separated tasks, fresh for every seed."""
    rng = np.random.default_rng([seed, PROMPT_STREAM])
    return [prompt_records.synthetic(tasks.sample(rng, task_names.split(","))) for _ in range(num)]


def read_records(path: str) -> list[dict]:
    """Every line of a .jsonl file of prompt records (the prompts record kind of llmjax.data.sources): a "prompt"
    and any fields a reward reads."""
    if not os.path.isfile(path):
        raise LlmjaxError(f"--prompts={path!r} does not exist; pass a .jsonl file of {{\"prompt\": ...}} lines, or "
                          "--prompts=synthetic")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt = record["prompt"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise LlmjaxError(f"{path}:{n}: not a JSON object with a \"prompt\" field; write one "
                                  "{\"prompt\": ...} object per line") from None
            if not isinstance(prompt, str) or not prompt:
                raise LlmjaxError(f"{path}:{n}: the prompt is not a non-empty string")
            records.append(record)
    if not records:
        raise LlmjaxError(f"{path} holds no prompts; write one {{\"prompt\": ...}} JSON object per line")
    return records


@dataclasses.dataclass(frozen=True)
class Samples:
    """Every prompt's N responses and their scores, kept whole so the choice can be checked and summarised."""

    prompts: list[str]
    responses: list[list[str]]  # [prompt][sample]
    scores: np.ndarray          # [prompts, n] float
    valid: np.ndarray           # [prompts, n] bool: ended with eos, and every token is one the tokenizer knows

    def best(self, min_score: float | None = None) -> list[dict]:
        """SFT records {"prompt", "response", "score"}: each prompt's best valid response (the first among ties),
        if it has one and its score reaches min_score."""
        scores = np.where(self.valid, self.scores, -np.inf)
        records = []
        for prompt, responses, row in zip(self.prompts, self.responses, scores, strict=True):
            i = int(np.argmax(row))
            if np.isfinite(row[i]) and (min_score is None or row[i] >= min_score):
                records.append({"prompt": prompt, "response": responses[i], "score": float(row[i])})
        return records

    def pairs(self) -> list[dict]:
        """Preference records {"prompt", "chosen", "rejected"} of the policy's own answers: each prompt's best and
        worst valid responses, where they differ in score (on-policy pairs for DPO or a reward model)."""
        records = []
        for prompt, responses, row, valid in zip(self.prompts, self.responses, self.scores, self.valid, strict=True):
            best, worst = np.where(valid, row, -np.inf), np.where(valid, row, np.inf)
            i, j = int(np.argmax(best)), int(np.argmin(worst))
            if valid.any() and row[i] > row[j]:
                records.append({"prompt": prompt, "chosen": responses[i], "rejected": responses[j]})
        return records

    def summary(self, min_score: float | None = None) -> dict:
        """Mean score of one sample against the best of N; with task prompts, the accuracy of one sample, of the
        chosen response and of an oracle choice (pass@N), whatever the scorer was."""
        chosen = np.argmax(np.where(self.valid, self.scores, -np.inf), axis=1)
        out = {"prompts": len(self.prompts), "n": self.scores.shape[1], "kept": len(self.best(min_score)),
               "valid": float(self.valid.mean()), "score/sample": float(self.scores.mean()),
               "score/best_of_n": float(self.scores[np.arange(len(chosen)), chosen].mean())}
        checkers = [task_of(p) for p in self.prompts]
        if None not in checkers:
            correct = self.valid & np.array([[task.check(p, r) for r in responses] for task, p, responses
                                             in zip(checkers, self.prompts, self.responses, strict=True)])
            out |= {"accuracy/sample": float(correct.mean()),
                    "accuracy/best_of_n": float(correct[np.arange(len(chosen)), chosen].mean()),
                    "accuracy/pass_at_n": float(correct.any(axis=1).mean())}
        return out


def best_of_n(params: transformer.Params, cfg, prompts: Sequence[str], n: int, score_fn: ScoreFn, key: jax.Array, *,
              batch_size: int = 256, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, constrain: Constrain = no_constrain, progress: bool = True) -> Samples:
    """Samples n responses per prompt from the policy (params, its run's cfg) through the chat template and
    scores them. The prompts, repeated n times, are generated and scored batch_size rows at a time, all
    left-padded to one width (the last batch filled with repeats) so the sampler compiles once."""
    if n < 1 or batch_size < 1:
        raise LlmjaxError(f"n={n} and batch_size={batch_size} must be positive")
    if n > 1 and temperature == 0.0:
        raise LlmjaxError("temperature=0 is greedy decoding: all n samples would be the same; use a temperature "
                          "> 0 (e.g. 1.0)")
    if not prompts:
        raise LlmjaxError("no prompts to sample from")
    if cfg.data.format != "chat":
        logger.warning("the policy trained on data.format=%r, but rejection sampling asks it through the chat "
                       "template; start from an SFT run", cfg.data.format)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    tokens_BP, lengths_B = sampling.left_pad([chat.prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_id)
    if tokens_BP.shape[1] + max_new_tokens > cfg.model.max_seq_len:
        raise LlmjaxError(f"prompts of {tokens_BP.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceed the "
                          f"model's max_seq_len={cfg.model.max_seq_len}; lower --max_new_tokens or shorten the prompts")
    generate = sampling.sampler(cfg.model, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                                vocab_size=tokenizer.vocab_size, constrain=constrain)
    rows = np.repeat(np.arange(len(prompts)), n)  # row r holds prompt r // n
    batch_size = min(batch_size, len(rows))
    responses, scores, valid = [], [], []
    with tqdm(total=len(rows), desc=f"best-of-{n}", unit="sample", disable=not progress) as bar:
        for chunk, start in enumerate(range(0, len(rows), batch_size)):
            idx = np.resize(rows[start:start + batch_size], batch_size)  # a full batch: one shape, one compilation
            out = jax.device_get(generate(params, tokens_BP[idx], lengths_B[idx], jax.random.fold_in(key, chunk)))
            texts = [tokenizer.decode(t[:m]) for t, m in zip(out["tokens"], out["lengths"], strict=True)]
            scores.append(np.asarray(score_fn([prompts[i] for i in idx], texts), np.float32))
            valid.append((out["tokens"] == tokenizer.eos_id).any(axis=1))
            responses += texts
            bar.update(min(batch_size, len(rows) - start))
    m = len(rows)
    return Samples(prompts=list(prompts), responses=[responses[i:i + n] for i in range(0, m, n)],
                   scores=np.concatenate(scores)[:m].reshape(-1, n),
                   valid=np.concatenate(valid)[:m].reshape(-1, n))


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    runs.write_whole(path, "".join(json.dumps(r) + "\n" for r in records))


def summary_path(out: str) -> str:
    """Where the summary of --out=OUT.jsonl goes: OUT.summary.json."""
    return os.path.splitext(out)[0] + ".summary.json"


def make_scorer(reward: str, records: Sequence[dict] = ()) -> ScoreFn:
    """--reward: "tasks" (the checkers, reading the task from each prompt), or any spec llmjax.rewards parses (a
    reward model run among its terms), each response scored with its prompt's record: `records` holds them, and
    the verifying terms (tasks, math, exact) are checked on every one before anything samples."""
    prompts = [r["prompt"] for r in records]
    if reward == "tasks":
        check_tasks(prompts, [""] * len(prompts))  # every prompt is a task's
        return check_tasks
    terms = rewards.parse(reward, "--reward")
    model = next((t.run for t in terms if t.run), None)
    if model and not os.path.exists(os.path.join(model, "config.json")):
        raise LlmjaxError(f"--reward={reward!r}: {model!r} is neither 'tasks' nor a run's workdir (no config.json) nor "
                          "a reward kind; pass a reward model run trained with configs/reward.py, or a spec such as "
                          "tasks, math, exact, format:REGEX, module.path:function")
    scorer = Scorer(model) if model else None
    by_prompt = {}
    for record in records:
        if by_prompt.setdefault(record["prompt"], record) != record:
            raise LlmjaxError(f"prompt {record['prompt'][:60]!r} is given twice with different fields; a reward "
                              "reads one record a prompt: drop or merge the duplicates")

    def score(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        try:
            return rewards.score(terms, prompts, responses, [by_prompt.get(p, {"prompt": p}) for p in prompts],
                                 scorer(prompts, responses) if scorer else None)[0]
        except rewards.RewardError as e:
            raise LlmjaxError(f"--reward={reward!r}: {e}") from None

    checked = [t for t in terms if t.name in rewards.CHECKERS]
    if checked and records:  # a missing "answer" or "task" is told now, not after sampling
        try:
            rewards.score(checked, prompts, [""] * len(prompts), records)
        except rewards.RewardError as e:
            raise LlmjaxError(f"--reward={reward!r}: {e}") from None
    return score


def policy_config(workdir: str) -> ml_collections.ConfigDict:
    """A language model run's config; a reward run is refused, as it cannot generate."""
    cfg = runs.run_config(workdir)
    if "lm" not in runs.run_parts(workdir):
        raise LlmjaxError(f"--policy={workdir!r} holds a reward model; pass a language model run (e.g. runs/sft) "
                          "and give the reward model as --reward")
    return cfg


def sample_to_files(policy: str, reward: str, records: Sequence[dict], out: str, pairs_out: str | None = None, *,
                    n: int = 8, seed: int = 0, min_score: float | None = None, batch_size: int = 256,
                    max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    mesh=None, progress: bool = True) -> dict:
    """What the CLI does, for scripts that have no command line: best-of-n from the policy run on the prompt
    records, the best written to `out` (and best/worst pairs to `pairs_out`), then the summary; returns it."""
    if not out.endswith(".jsonl"):
        raise LlmjaxError(f"--out={out!r}: name it FILE.jsonl, the suffix llmjax.data.sources reads records from")
    cfg = policy_config(policy)
    score_fn = make_scorer(reward, records)
    mesh = mesh or make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = runs.load_params(policy, mesh, reader="rejection sampling")
    samples = best_of_n(params, cfg, [r["prompt"] for r in records], n, score_fn, jax.random.key(seed),
                        batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, constrain=make_constrain(mesh, cfg.rules), progress=progress)
    kept = samples.best(min_score)
    if not kept:
        logger.warning("no response was kept; lower --min_score or raise --n, --max_new_tokens")
    write_jsonl(out, kept)
    if pairs_out:
        write_jsonl(pairs_out, samples.pairs())
    summary = samples.summary(min_score) | {"policy": policy, "reward": reward, "min_score": min_score}
    runs.write_whole(summary_path(out), json.dumps(summary, indent=2))
    return summary


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.prompts == "synthetic":
        records = synthetic_records(policy_config(f.policy).data.tasks, f.num_prompts, f.seed)
    else:
        records = read_records(f.prompts)
    summary = sample_to_files(f.policy, f.reward, records, f.out, f.pairs_out, n=f.n, seed=f.seed,
                              min_score=f.min_score, batch_size=f.batch_size, max_new_tokens=f.max_new_tokens,
                              temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":  # flags only for the command line: the pipeline experiment imports this module
    flags.DEFINE_string("policy", None, "The policy run's workdir (e.g. runs/sft); its latest checkpoint samples.",
                        required=True)
    flags.DEFINE_string("reward", None, "A reward model run's workdir, 'tasks' for the synthetic tasks' checkers, or "
                        "a reward spec of llmjax.rewards (math, exact, format:REGEX, module:function, sums).",
                        required=True)
    flags.DEFINE_string("out", None, "Where to write the best responses as {prompt, response, score} lines.",
                        required=True)
    flags.DEFINE_string("pairs_out", None, "Also write each prompt's best and worst responses as preference records "
                        "{prompt, chosen, rejected} (on-policy pairs for DPO).")
    flags.DEFINE_integer("n", 8, "Responses sampled per prompt.")
    flags.DEFINE_string("prompts", "synthetic", "'synthetic' (the policy's data.tasks) or a .jsonl of {prompt, ...} "
                        "records (their other fields, e.g. an answer, are what the reward reads).")
    flags.DEFINE_integer("num_prompts", 256, "Prompts drawn with --prompts=synthetic.")
    flags.DEFINE_float("min_score", None, "Keep a prompt's best response only if its score reaches this.")
    flags.DEFINE_integer("batch_size", 256, "Sequences generated and scored per call (prompts x n in all).")
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens per response at most; unfinished responses are never kept.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0: the N samples must differ).")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens with this probability.")
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic prompts and of sampling.")
    run_main(main)
