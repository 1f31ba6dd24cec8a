"""Silent keys: every key of every shipped config either changes what a run computes or is refused.

A key that is read nowhere (or read and then ignored) lets a user believe they changed a run when they did not.
For each config, every key is changed on its own (see `alternatives`) and the run's fingerprint compared with the
unchanged config's. Compiling or training every variant would take far too long, so the fingerprint is what a run
is made of, gathered without compiling: the refusal (a LlmjaxError from building the task), else the FLOPs per
token, the evaluator's held-out data, the first batch, the traced step (its jaxpr with every constant, and where
its arguments live: the model, loss, optimizer and placement), PPO's rollout stages traced one by one, and the
start state. Pieces are compared cheapest first, and only until one differs. A refused change is fine; the next
alternative is then tried, if there is one.

Keys whose effect lies outside that fingerprint are in ALLOW, each with its reason; keys that only matter when
another key has some value are changed in that setting (CONTEXT). Sections read by shared code the same way in
every objective (the model, mesh, rules, optimizer) are walked on the pretrain config only.
"""

import functools
import hashlib
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import saved_run

from llmjax import config, losses
from llmjax.data import tasks
from llmjax.errors import LlmjaxError
from llmjax.train import distill, registry
from llmjax.train.rollout import Rollout, Sampled

# Keys whose effect a few-step run's fingerprint cannot see, and what each does.
ALLOW = {
    "steps": "the loop's length (llmjax.train.loop.run), besides the schedule's decay",
    "log_every": "when the loop logs",
    "eval_every": "when the loop evaluates (0: never); what evaluation computes is fingerprinted",
    "checkpoint.every": "when the loop saves",
    "checkpoint.keep": "how many checkpoints the loop keeps",
    "checkpoint.use_async": "whether saving blocks the loop",
    "optim.max_nonfinite": "when the loop stops a diverging run; no step of a finite run reads it",
    "peak_flops": "the MFU the loop logs",
    "distributed": "read by llmjax.main before any run: jax.distributed.initialize()",
    "model.name": "a label: the preset's name in logs, bench and estimate output, and error messages",
    "data.data_dir": "where a files: source's prepared copy is cached (a tfds: one found): the same records",
    "data.mixture.stdlib.epochs": "when a source's last pass ends the run; a few steps never reach it",
}

# Read by the model, sharding and optimizer code the same way for every objective: walked on the pretrain config
# only. optim.grad_accum is the exception: each objective passes it to its own step.
SHARED = ("model.", "mesh.", "rules.", "optim.", "lora.")
PER_OBJECTIVE = ("optim.grad_accum",)

# name -> (config, which keys to walk: "all", "own" (all but SHARED), or a case whose values to differ from)
CASES = {
    "pretrain": ("configs/pretrain.py", "all"),
    "sft": ("configs/sft.py", "own"),
    "reward": ("configs/reward.py", "own"),
    "dpo": ("configs/dpo.py", "own"),
    "ppo": ("configs/ppo.py", "own"),
    "grpo": ("configs/ppo.py:algorithm=grpo", "ppo"),  # what GRPO sets; the other keys: the ppo case
    "distill": ("configs/distill.py", "own"),
    # One package of the standard library, not all 32 MB of it; validation=0.2 so that its 29 files hold some out.
    "stdlib": ("configs/stdlib.py:subdir=email,validation=0.2", "own"),
    "mixture": ("configs/mixture.py:subdir=email,validation=0.2", "stdlib"),  # what a mixture sets
    "extend": ("configs/extend.py:base=lm,seq_len=512", "pretrain"),  # the extension stage of the fake lm run: 8 rows
}

# key -> the setting in which it matters: {other key: value}, or cfg -> that ("files": a files: source of the
# config's kind of records). A key whose setting the config refuses cannot matter there and is not walked.
CONTEXT = {
    "model.max_seq_len": {"model.pos": "learned"},  # the learned position table; RoPE has none
    "mesh.fsdp": {"mesh.data": -1, "mesh.fsdp": 2},  # with fsdp=-1 and the rest 1, its only valid value is 8
    # RoPE scaling: its factor and type on a scaled model; each type's own parameters under that type
    **dict.fromkeys(("model.rope_scaling", "model.rope_type"),
                    {"model.rope_type": "linear", "model.rope_scaling": 4.0}),
    **{f"model.rope_{k}": {"model.rope_type": "llama3", "model.rope_scaling": 8.0}  # Llama 3.1's
       for k in ("low_freq_factor", "high_freq_factor")},
    # YaRN rounds its correction dimensions (8192: 3.2 and 6.2 of tiny's 8) to whole ones: at 14000 (3.7, 6.7),
    # halving a beta or doubling the length moves them (by 0.6) to others
    **{f"model.rope_{k}": {"model.rope_type": "yarn", "model.rope_scaling": 8.0, "model.rope_original_max_len": 14000}
       for k in ("original_max_len", "beta_fast", "beta_slow", "attn_factor")},
    **{f"rules.{k}": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}  # a rule naming a size-1 axis places nothing
       for k in config.base().rules},
    # The held-out share of a files: source; the synthetic tasks, which a files: source neither trains nor
    # evaluates on (its evaluation is the perplexity of its held-out share alone).
    "data.validation": lambda cfg: {} if cfg.data.source.startswith("files:") else {"data.source": "files"},
    **dict.fromkeys(("data.tasks", "eval_prompts"),
                    lambda cfg: {} if cfg.data.source == "synthetic" else {"data.source": "synthetic"}),
    "dpo.simpo_gamma": {"dpo.loss": "simpo"},
    "ppo.group_size": {"ppo.algorithm": "grpo"},  # GRPO's samples per prompt
    "ppo.kl_horizon": {"ppo.target_kl": 0.1},  # how fast the adaptive KL coefficient moves
    **dict.fromkeys(("ppo.baseline", "ppo.scale_rewards", "ppo.dynamic_sampling"), {"ppo.algorithm": "grpo"}),
    "eval_temperature": {"eval_samples": 4},  # the pass@k answers' temperature
    "reward.onpolicy_fraction": {"reward.onpolicy": "files"},  # the share of rows from the on-policy pairs
    # The mixture of experts' keys, on a model with experts (an expert rule: on a mesh with an expert axis).
    **dict.fromkeys((f"model.moe_{k}" for k in ("top_k", "every", "d_ff", "renormalize", "shared_d_ff", "dispatch",
                                                  "balance_coef", "z_coef")), {"model.moe_experts": 4}),
    "model.moe_shared_gate": {"model.moe_experts": 4, "model.moe_shared_d_ff": 32},
    "model.moe_capacity_factor": {"model.moe_experts": 4, "model.moe_dispatch": "capacity"},
    "rules.experts": {"mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.moe_experts": 4},
    "lora.targets": {"init_from": "lm"},  # LoRA adapts a trained model
    **dict.fromkeys(("lora.rank", "lora.alpha", "lora.init", "lora.dropout"), {"lora.targets": "all",
                                                                                 "init_from": "lm"}),
    "distill.beta": {"distill.divergence": "jsd"},
    "optim.decay_fraction": {"optim.schedule": "wsd"},
    "model.layer_types": {"model.sliding_window": 8},
    "model.attn_block": {"model.attention": "blockwise"},
    "model.context_parallel": {"mesh.context": 2},
    **dict.fromkeys(("distill.tasks", "distill.max_prompt_len", "distill.max_new_tokens"), {"distill.on_policy": True}),
}

# Alternatives, tried in order, for keys whose type gives no sensible change ("files", "lm", "rm": see `resolve`).
ALTERNATIVES = {
    **registry.CHOICES,
    "trainer": tuple(registry.OBJECTIVES),
    "model.name": ("tiny", "small"),
    "model.attn_causal_block": (0, 16),
    "model.sliding_window": (8,),
    "model.layer_types": ("sliding,full",),
    "model.attn_block": (16,),
    "model.moe_experts": (4,),
    "data.source": ("synthetic", "files"),
    "data.tokenizer": ("synthetic", "byte"),
    "data.tasks": ("sort", "reverse"),
    "data.validation": (0.5, 0.25),  # halving a small share may hold out the very same files
    "data.weights": ("tasks=0.5, stdlib=0.5", "a=1"),
    "data.mixture.tasks.source": ("synthetic:sort",),
    "data.mixture.stdlib.source": ("files",),
    **dict.fromkeys(("data.mixture.tasks.format", "data.mixture.stdlib.format"), ("text", "chat")),
    "optim.decay_fraction": (0.5,),  # on 4 steps, 0.1 and 0.2 both decay over one
    "init_from": ("", "lm"),
    "reward.read": ("last", "eos"),
    "reward.negatives": ("corrupt", "corrupt,permute,neighbour"),
    "reward.onpolicy": ("", "files"),
    "reward.onpolicy_fraction": (1.0,),  # halved, the first batch may hold the same rows
    "dpo.loss": ("sigmoid", "ipo", "hinge", "cdpo", "simpo"),
    "dpo.reference": ("live", "precomputed"),
    "ppo.algorithm": ("ppo", "grpo"),
    "ppo.reward": ("rm", "tasks"),
    "ppo.tasks": ("sort", "reverse"),
    "ppo.value": ("separate", "shared"),
    "ppo.kl_estimator": ("k1", "k2", "k3"),
    "ppo.loss_agg": losses.AGGREGATIONS,
    "ppo.baseline": losses.BASELINES,
    "distill.teacher": ("lm", "rm"),
    "distill.divergence": losses.DIVERGENCES,
    "distill.tasks": ("sort", "reverse"),
    "lora.targets": ("all", "wq,wv"),
    "lora.init": ("kaiming", "gaussian"),
    # Each rule moved so that it places something on the 2x2x2 mesh (an axis an earlier dimension took is skipped).
    "rules.batch": ("data",), "rules.embed": ("",), "rules.vocab": ("",), "rules.heads": ("",),
    "rules.kv_heads": ("",), "rules.mlp": ("",), "rules.layers": ("fsdp",), "rules.seq": ("tensor",),
    "rules.head_dim": ("data",), "rules.act_embed": ("tensor",), "rules.experts": ("fsdp",),
}


def leaves(cfg, prefix: str = "") -> dict:
    """Every leaf of a config by its dotted key."""
    out = {}
    for k, v in cfg.items():
        out |= leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v}
    return out


def resolve(value, cfg, runs: dict):
    """Placeholders: "lm" and "rm" for the fake runs, "files" for a files: source of cfg's kind of records."""
    if value == "files":
        return "files:" + runs["files"]["preference" if cfg.trainer in ("reward", "dpo") else cfg.data.format]
    return runs[value] if value in ("lm", "rm") else value


def alternatives(key: str, cfg, runs: dict) -> list:
    """Other values for cfg's `key`, in the order to try them: from ALTERNATIVES, else by type (bool: not; int:
    x2 or /2, 0 -> 1; float: /2 or x2, 0 -> 0.1)."""
    value = leaves(cfg)[key]
    if key in ALTERNATIVES:
        options = [resolve(v, cfg, runs) for v in ALTERNATIVES[key]]
    elif isinstance(value, bool):
        options = [not value]
    elif isinstance(value, int):
        options = [value * 2, value // 2] if value else [1]
    elif isinstance(value, float):
        options = [value / 2, value * 2] if value else [0.1]
    else:
        raise TypeError(f"no alternative for {key}={value!r}: add some to ALTERNATIVES")
    return [v for v in dict.fromkeys(options) if v != value]


def apply(cfg, overrides: dict, runs: dict):
    cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        config.override(cfg, key, resolve(value, cfg, runs))
    return cfg


def load(case: str, runs: dict):
    """A shipped config on the tiny model (a config with a base run: that run's), 4 steps, reading the fake runs,
    caching data in the test's folder."""
    path, _, arg = CASES[case][0].partition(":")
    size = "steps=4" if "base=lm" in arg else "model=tiny,steps=4"
    arg = arg.replace("base=lm", f"base={runs['lm']}")
    cfg = config.load(f"{runs['root']}/{path}:{','.join(filter(None, [arg, size]))}")
    cfg.data.data_dir = runs["data_dir"]
    if cfg.init_from:
        cfg.init_from = runs["lm"]
    if "ppo" in cfg:
        cfg.ppo.reward = runs["rm"]
    if "distill" in cfg:
        cfg.distill.teacher = runs["lm"]
    return cfg


def walked(case: str, runs: dict) -> list[str]:
    cfg, which = load(case, runs), CASES[case][1]
    keys = leaves(cfg)
    if which == "own":
        keys = {k: v for k, v in keys.items() if not k.startswith(SHARED) or k in PER_OBJECTIVE}
    elif which != "all":
        other = leaves(load(which, runs))
        keys = {k: v for k, v in keys.items() if other.get(k) != v}
    return [k for k in keys if k not in ALLOW]


# ---- fingerprints -------------------------------------------------------------------------------------------

def digest(tree) -> str:
    """Paths, shapes, dtypes and values of a pytree's leaves (arrays, or anything with a stable repr)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        h.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, (jax.Array, np.ndarray)):
            x = np.asarray(jax.device_get(leaf))
            h.update(f"{x.shape}{x.dtype}".encode() + x.tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def traced(t: jax.stages.Traced, args) -> str:
    """A traced function's jaxpr, with every constant it holds and where each of its arguments lives."""
    jaxpr = t.jaxpr
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(args)]
    return hashlib.sha256(str(jaxpr).encode()).hexdigest() + digest(jaxpr.consts) + digest(repr(shardings))


def captured(fn) -> str:
    """The data a function's closure holds (arrays, strings, numbers, through nested closures and containers):
    for the evaluator, its held-out batches and prompts, without running it (that compiles a sampler)."""
    h, seen = hashlib.sha256(), set()

    def visit(x):
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, (jax.Array, np.ndarray)):
            x = np.asarray(jax.device_get(x))
            h.update(f"{x.shape}{x.dtype}".encode() + x.tobytes())
        elif isinstance(x, (str, int, float, bool, tasks.Example)):
            h.update(repr(x).encode())
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(k)
                visit(v)
        elif isinstance(x, functools.partial):  # e.g. a sampler's settings
            visit(x.args)
            visit(x.keywords)
        elif hasattr(x, "__wrapped__"):  # a jitted function: what it wraps
            visit(x.__wrapped__)
        elif getattr(x, "__closure__", None):  # a plain function
            for cell in x.__closure__:
                visit(cell.cell_contents)

    visit(fn)
    return h.hexdigest()


def stage(name: str, fn, *args):
    """Yields the trace of the jitted fn on args as the piece `name`; returns its outputs' shapes."""
    t = fn.trace(*args)
    yield name, traced(t, args)
    return t.out_info


def rollout(task):
    """PPO's batch source, traced stage by stage instead of run (running it compiles a sampler for each variant):
    the prompts, sampling, the training and reward-model rows, the reward model, the rewards of fixed answers, the
    experience. Mirrors ppo's Rollout.__call__; returns the rollout batch's shapes."""
    r, params = task.source, task.abstract.params
    records = r.prompts(0)
    yield "prompts", digest([repr(x) for x in records])
    ids, lengths = r.encode(records)
    out = yield from stage("sample", r._generate, params["policy"], ids, lengths, jax.random.key(0))
    rows, scored = yield from stage("rows", r._rows, ids, lengths, out)
    if r.reward_model is not None:
        yield "reward model", digest(r.reward_model)
        yield from stage("score", r._score, r.reward_model, scored)
    n = len(records)  # answers: the right one or not, ended or cut off, of every length
    answers = [str(x.get("answer", "")) if i % 3 else "no" for i, x in enumerate(records)]
    fake = Sampled(rows, scored, answers, np.arange(n) % (r.cfg.ppo.max_new_tokens + 1), np.arange(n) % 2 == 0)
    model = None if r.reward_model is None else np.linspace(-1, 1, n)
    scores, made = r.combine(records, fake, model)
    yield "rewards", digest((scores, made))
    batch, _ = yield from stage("experience", r._experience, params, rows, scores, task.abstract.extra["kl_coef"])
    return batch


def on_policy(task):
    """On-policy distillation's batch source, traced stage by stage as `rollout` is: the prompts, sampling, rows."""
    r, params = task.source, task.abstract.params
    records = r.prompts(0)
    yield "prompts", digest([repr(x) for x in records])
    ids, lengths = r.encode(records)
    out = yield from stage("sample", r._generate, params, ids, lengths, jax.random.key(0))
    rows = yield from stage("rows", r._rows, ids, lengths, out)
    return {k: v for k, v in rows.items() if k != "old_logp"}


def start(cfg, task) -> str:
    """The start state: its traced initialisation, or its values for a run started from another's parameters (its
    start reads them from the checkpoint, which cannot be traced; and its init compiles to almost nothing); and
    the step's frozen arguments (a DPO reference)."""
    init = digest(task.start()) if cfg.init_from else traced(jax.jit(task.start).trace(), ())
    return init + digest(task.frozen)


def fingerprint(cfg, workdir: str):
    """Yields (piece, value) of what a run of cfg computes, cheapest first: ("refused", message) if building its
    task raises a LlmjaxError, ("crashed", error) for any other exception."""
    try:
        task = registry.task(cfg, workdir)
        yield "flops per token", task.flops_per_token
        yield "evaluation", captured(task.evaluate)
        if isinstance(task.source, Rollout):
            batch = yield from rollout(task)
        elif isinstance(task.source, distill.OnPolicy):
            batch = yield from on_policy(task)
        else:
            batch, made = task.source(task.abstract, 0)
            yield "batch", digest((batch, made))
        shardings = jax.tree.map(lambda x: x.sharding, task.abstract)
        args = (task.abstract, batch, *task.frozen)
        yield "step", traced(task.jit_step(shardings).trace(*args), args)
        yield "start", start(cfg, task)
    except LlmjaxError as e:
        yield "refused", str(e)
    except Exception as e:  # reported by the test
        yield "crashed", f"{type(e).__name__}: {e}"


class Run:
    """A config's fingerprint, computed piece by piece as comparisons ask for it."""

    workdirs = itertools.count()

    def __init__(self, cfg, root):
        self.pieces, self.gen = [], fingerprint(cfg, str(root / f"w{next(Run.workdirs)}"))

    def __getitem__(self, i):
        while len(self.pieces) <= i:
            self.pieces.append(next(self.gen, None))
        return self.pieces[i]

    @property
    def outcome(self):
        """("refused" or "crashed", message); None for a config that runs."""
        return self[0] if self[0][0] in ("refused", "crashed") else None

    def first_difference(self, other) -> str | None:
        """The first piece that differs from other's, None if none does."""
        for i in itertools.count():
            if self[i] != other[i]:
                return (self[i] or other[i])[0]
            if self[i] is None or self[i][0] in ("refused", "crashed"):
                return None


# ---- fixtures and the test ----------------------------------------------------------------------------------

def fake_run(cfg, workdir: str) -> str:
    """A loadable run of cfg's objective without compiling anything: its state's shapes, filled with noise."""
    task = registry.task(cfg, "")
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jax.device_put((0.02 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding),
                         task.abstract)
    saved_run(cfg, workdir, state=state)
    return workdir


def files(folder, kind: str) -> str:
    """A files: source of 200 records of `kind` (text, chat or preference) from the synthetic tasks; text and chat
    records hold ten examples each, so that a small held-out share still fills evaluation rows quickly."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    examples = [[tasks.sample(rng, list(tasks.TASKS)) for _ in range(10)] for _ in range(200)]
    if kind == "text":
        (folder / "docs.txt").write_text("\n\n".join(" ".join(ex.text for ex in exs) for exs in examples))
        return str(folder)
    lines = [{"prompt": exs[0].prompt, "response": " ".join(ex.text for ex in exs)} if kind == "chat" else
             {"prompt": exs[0].prompt, "chosen": exs[0].answer, "rejected": tasks.corrupt(exs[0], rng)}
             for exs in examples]
    (folder / "records.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """What the configs read: a language model run (init_from), a reward model run (ppo.reward), files: sources."""
    root = tmp_path_factory.mktemp("keys")
    out = {"root": str(Path(__file__).resolve().parents[1]), "data_dir": str(root / "tfds")}
    out["lm"] = fake_run(config.load(f"{out['root']}/configs/pretrain.py:model=tiny"), str(root / "lm"))
    out["rm"] = fake_run(config.load(f"{out['root']}/configs/reward.py:model=tiny", init_from=""), str(root / "rm"))
    out["files"] = {kind: files(root / kind, kind) for kind in ("text", "chat", "preference")}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_key_changes_the_run_or_is_refused(case, runs, tmp_path):
    """Each key of the config, changed alone (in its CONTEXT), is refused or changes the run's fingerprint."""
    cfg, baselines = load(case, runs), {}

    def baseline(context: dict) -> Run:
        key = json.dumps(context, sort_keys=True)
        if key not in baselines:
            baselines[key] = Run(apply(cfg, context, runs), tmp_path)
        return baselines[key]

    # The fingerprint sees no difference where there is none: a second task, a loop-only key changed.
    assert baseline({}).outcome is None, f"{case}: the shipped config does not run: {baseline({}).outcome}"
    assert baseline({}).first_difference(Run(apply(cfg, {"log_every": 7}, runs), tmp_path)) is None

    silent, crashed = [], []
    for key in walked(case, runs):
        context = CONTEXT.get(key, {})
        context = context(cfg) if callable(context) else context
        before = baseline(context)
        if before.outcome and before.outcome[0] == "crashed":
            crashed.append(f"{key}'s setting {context}: {before.outcome[1][:300]}")
        if before.outcome is not None:
            continue  # this config refuses the setting the key needs: it cannot matter here
        start_cfg = apply(cfg, context, runs)
        value = leaves(start_cfg)[key]
        for new in alternatives(key, start_cfg, runs):
            after = Run(apply(start_cfg, {key: new}, runs), tmp_path)
            if after.outcome and after.outcome[0] == "refused":
                continue  # refused: fine; try a change it accepts
            where = f"{key}={value!r}->{new!r}" + (f" (with {context})" if context else "")
            if after.outcome:
                crashed.append(f"{where}: {after.outcome[1][:300]}")
            elif before.first_difference(after) is None:
                silent.append(where)
            break
    assert not silent and not crashed, (
        f"{case} config: keys whose change leaves the run as it was, unrefused (use or refuse them, or add them to "
        f"ALLOW with a reason): {silent}; changes that crash instead of being refused: {crashed}")
