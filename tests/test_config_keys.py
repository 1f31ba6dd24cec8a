"""Silent keys: every key of every shipped config either changes what a run computes or is refused.

A key that is read nowhere (or read and then ignored) lets a user believe they changed a run when they did not.
For each config, every key is changed on its own (the change derived from its type, see `changed`) and the run's
fingerprint compared with the unchanged config's. Compiling or training every variant would take far too long,
so the fingerprint is what a run is made of, gathered without compiling anything: the refusal (a ConfigError from
building the task), else the FLOPs per token, the evaluator's held-out data, the first batch, the lowered step
(HLO text: the model, loss, optimizer and shardings, constants included), PPO's rollout stages lowered one by
one, and the start state. Pieces are compared cheapest first and only until one differs.

Keys whose effect lies outside that fingerprint are in ALLOW, each with its reason; keys that only matter when
another key has some value are changed in that setting (CONTEXT). Sections read by shared code the same way in
every objective (the model, mesh, rules, optimizer) are walked on the pretrain config only.
"""

import hashlib
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import checkpoint, config, sampling
from llmjax.config import ConfigError
from llmjax.data import chat, tasks
from llmjax.train import ppo, registry

# Keys a few-step run's fingerprint cannot see, and why each is still worth having.
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
    "data.data_dir": "where a files: source's prepared copy is cached (a tfds: one found): the same records",
}

# Shared sections: read by the model, sharding and optimizer code identically for every objective, so walked on
# the pretrain config only; optim.grad_accum is wired into each objective's step by the objective itself.
SHARED = ("model.", "mesh.", "rules.", "optim.")
PER_OBJECTIVE = ("optim.grad_accum",)

# name -> (config, which keys to walk: "all", "own" (all but SHARED), or the name of a case to differ from)
CASES = {
    "pretrain": ("configs/pretrain.py", "all"),
    "sft": ("configs/sft.py", "own"),
    "reward": ("configs/reward.py", "own"),
    "dpo": ("configs/dpo.py", "own"),
    "ppo": ("configs/ppo.py", "own"),
    "grpo": ("configs/ppo.py:algorithm=grpo", "ppo"),  # GRPO's own choices; the other ppo.* keys: the ppo case
    # A package of the standard library, not all of it (32 MB); validation=0.2 so that its few files hold some out.
    "stdlib": ("configs/stdlib.py:subdir=email,validation=0.2", "own"),
}

MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def _files_source(cfg) -> dict:
    return {} if cfg.data.source.startswith("files:") else {"data.source": "files"}


# key -> the setting in which it matters ({other key: value}, or cfg -> that); "files" is a files: source of the
# config's kind of records. A key whose setting the config refuses cannot matter there and is not walked.
CONTEXT = {
    "model.max_seq_len": {"model.pos": "learned"},  # the learned position table; RoPE needs none
    **{f"model.rope_{k}": {"model.rope_scaling": 8.0} for k in ("low_freq_factor", "high_freq_factor",
                                                                 "original_max_len")},  # Llama 3.1 scaling only
    **{f"rules.{k}": MESH_222 for k in config.base().rules},  # a rule naming a size-1 axis places nothing
    "data.validation": _files_source,  # the held-out share of a files: source
    "data.tasks": lambda cfg: {} if cfg.data.source == "synthetic" else {"data.source": "synthetic"},
    "dpo.simpo_gamma": {"dpo.loss": "simpo"},
    "ppo.group_size": {"ppo.algorithm": "grpo"},  # GRPO's samples per prompt
    "ppo.kl_horizon": {"ppo.target_kl": 0.1},  # the adaptive KL coefficient's horizon
}

# String keys: the first alternative that differs from the current value ("files", "lm", "rm": see `resolve`).
ALTERNATIVES = {
    **{key: choices for key, choices in registry.CHOICES.items()},
    "trainer": ("pretrain", "reward"),
    "model.name": ("tiny", "small"),
    "model.attn_causal_block": (0, 16),
    "data.source": ("synthetic", "files"),
    "data.tokenizer": ("synthetic", "byte"),
    "data.tasks": ("sort", "reverse"),
    "data.validation": (0.5, 0.25),  # halving a small share may hold out the same few files
    "init_from": ("", "lm"),
    "reward.read": ("last", "eos"),
    "dpo.loss": ("sigmoid", "ipo"),
    "dpo.reference": ("live", "precomputed"),
    "ppo.algorithm": ("ppo", "grpo"),
    "ppo.reward": ("rm", "tasks"),
    "ppo.tasks": ("sort", "reverse"),
    "ppo.value": ("separate", "shared"),
    "ppo.kl_estimator": ("k1", "k2"),
    # Each rule moved so that it places something on the 2x2x2 mesh (an axis an earlier dimension took is skipped).
    "rules.batch": ("data",), "rules.embed": ("",), "rules.vocab": ("",), "rules.heads": ("",),
    "rules.kv_heads": ("",), "rules.mlp": ("",), "rules.layers": ("fsdp",), "rules.seq": ("tensor",),
    "rules.head_dim": ("data",), "rules.act_embed": ("tensor",),
}


def changed(key: str, cfg, runs: dict):
    """Another value for cfg's `key`: an alternative from the table, else by type (bool: not; int: x2, 0 -> 1;
    float: /2, 0 -> 0.1)."""
    value = leaves(cfg)[key]
    if key in ALTERNATIVES:
        return next(v for v in (resolve(v, cfg, runs) for v in ALTERNATIVES[key]) if v != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value / 2 if value else 0.1
    raise TypeError(f"no alternative for {key}={value!r}: add one to ALTERNATIVES")


def resolve(value, cfg, runs: dict):
    """Placeholders: "lm" and "rm" for the fake runs, "files" for a files: source of cfg's kind of records."""
    if value == "files":
        return "files:" + runs["files"]["preference" if cfg.trainer in ("reward", "dpo") else cfg.data.format]
    return runs[value] if value in ("lm", "rm") else value


def leaves(cfg, prefix="") -> dict:
    """Every leaf key of a config, dotted."""
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out |= leaves(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def load(case: str, runs: dict):
    """A shipped config on the tiny model, reading the fake runs below, its data cache in the test's folder."""
    spec, _ = CASES[case]
    path, _, arg = spec.partition(":")
    cfg = config.load(f"{runs['root']}/{path}:{','.join(filter(None, [arg, 'model=tiny,steps=4']))}")
    cfg.data.data_dir = runs["data_dir"]
    if cfg.init_from:
        cfg.init_from = runs["lm"]
    if "ppo" in cfg:
        cfg.ppo.reward = runs["rm"]
    return cfg


def apply(cfg, overrides: dict, runs: dict):
    cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        config.override(cfg, key, resolve(value, cfg, runs))
    return cfg


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


def text(lowered) -> str:
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


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
        elif callable(x) and getattr(x, "__closure__", None):  # a plain function; compiled ones hold no data
            for cell in x.__closure__:
                visit(cell.cell_contents)

    visit(fn)
    return h.hexdigest()


def lowered(name: str, fn, *args):
    """Yields fn's lowered text as the fingerprint piece `name`; returns its outputs' shapes."""
    low = fn.lower(*args)
    yield name, text(low)
    return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), low.out_info)


def rollout(task):
    """PPO's batch source, lowered stage by stage instead of run (running it compiles a sampler per variant):
    the prompts, sampling, the training and reward-model rows, the reward model, and the experience. Mirrors
    ppo.Rollout.sample; returns the rollout batch's shapes."""
    r, params = task.source, task.abstract.params
    examples = r.prompts(0)
    yield "prompts", digest([repr(ex) for ex in examples])
    ids, lengths = (r._put(x) for x in sampling.left_pad([chat.prompt_ids(r.tokenizer, ex.prompt)
                                                          for ex in examples]))
    out = yield from lowered("sample", r._generate, params["policy"], ids, lengths, jax.random.key(0))
    rows, scored = yield from lowered("rows", r._rows, ids, lengths, out)
    if r.reward_model is None:  # the tasks' checkers
        scores = jax.ShapeDtypeStruct((len(examples),), jnp.float32, sharding=r.sharding)
    else:
        yield "reward model", digest(r.reward_model)
        scores = yield from lowered("score", r._score, r.reward_model, scored)
    batch, _ = yield from lowered("experience", r._experience, params, rows, scores, task.abstract.extra["kl_coef"])
    return batch


def start(task) -> str:
    """The start state: its lowered initialisation, or its values when it reads another run's checkpoint (that
    cannot be traced); and the step's frozen arguments (a DPO reference)."""
    try:
        init = text(jax.jit(task.start).lower())
    except Exception:  # reads a checkpoint: run it (with init_from, the init compiles to almost nothing)
        init = digest(task.start())
    return init + digest(task.frozen)


def fingerprint(cfg, workdir: str):
    """Yields (piece, value) of what a run of cfg computes, cheapest first; ("refused", message) if building its
    task raises a ConfigError, ("crashed", error) for any other exception."""
    try:
        task = registry.task(cfg, workdir)
        yield "flops per token", task.flops_per_token
        yield "evaluation", captured(task.evaluate)
        if isinstance(task.source, ppo.Rollout):
            batch = yield from rollout(task)
        else:
            batch, made = task.source(task.abstract, 0)
            yield "batch", digest((batch, made))
        shardings = jax.tree.map(lambda x: x.sharding, task.abstract)
        yield "step", text(task.jit_step(shardings).lower(task.abstract, batch, *task.frozen))
        yield "start", start(task)
    except ConfigError as e:
        yield "refused", str(e)
    except Exception as e:  # noqa: BLE001 (reported by the test, not raised)
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

    def first_difference(self, other) -> str | None:
        """The first piece that differs from other's, None if none does."""
        for i in itertools.count():
            a, b = self[i], other[i]
            if a != b:
                return (a or b)[0]
            if a is None or a[0] in ("refused", "crashed"):
                return None

    @property
    def outcome(self):
        """("refused"|"crashed", message), or None for a run."""
        first = self[0]
        return first if first and first[0] in ("refused", "crashed") else None


# ---- fixtures and the test ----------------------------------------------------------------------------------

def fake_run(cfg, workdir: str) -> str:
    """A loadable run of cfg's objective without compiling anything: its state's shapes, filled with noise."""
    task = registry.task(cfg, "")
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jax.device_put((0.02 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding),
                         task.abstract)
    checkpoint.claim_workdir(workdir, cfg, task.parts)
    mngr = checkpoint.manager(workdir, cfg)
    checkpoint.save(mngr, 1, state)
    mngr.wait_until_finished()
    mngr.close()
    return workdir


def files(folder, kind: str) -> str:
    """A files: source of 200 synthetic-task records of `kind`: text, chat (sft) or preference."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    examples = [tasks.sample(rng, list(tasks.TASKS)) for _ in range(200)]
    if kind == "text":
        (folder / "docs.txt").write_text("\n\n".join(ex.text for ex in examples))
    else:
        lines = [{"prompt": ex.prompt, "response": ex.answer} if kind == "chat" else
                 {"prompt": ex.prompt, "chosen": ex.answer, "rejected": tasks.corrupt(ex, rng)} for ex in examples]
        (folder / "records.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict:
    """Paths the configs read: a language model run (init_from), a reward model run (ppo.reward), files: sources."""
    root = tmp_path_factory.mktemp("keys")
    out = {"root": str(request.config.rootpath), "data_dir": str(root / "tfds")}
    lm = config.load(f"{out['root']}/configs/pretrain.py:model=tiny")
    out["lm"] = fake_run(lm, str(root / "lm"))
    out["rm"] = fake_run(config.load(f"{out['root']}/configs/reward.py:model=tiny", init_from=""), str(root / "rm"))
    out["files"] = {kind: files(root / kind, kind) for kind in ("text", "chat", "preference")}
    return out


def walked(case: str, runs: dict) -> list[str]:
    cfg, (_, which) = load(case, runs), CASES[case]
    keys = leaves(cfg)
    if which == "own":
        keys = {k: v for k, v in keys.items() if not k.startswith(SHARED) or k in PER_OBJECTIVE}
    elif which != "all":
        other = leaves(load(which, runs))
        keys = {k: v for k, v in keys.items() if other.get(k) != v}
    return [k for k in keys if k not in ALLOW]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_key_changes_the_run_or_is_refused(case, runs, tmp_path):
    cfg = load(case, runs)
    baselines = {}

    def baseline(context: dict) -> Run:
        key = json.dumps(context, sort_keys=True)
        if key not in baselines:
            baselines[key] = Run(apply(cfg, context, runs), tmp_path)
        return baselines[key]

    # The fingerprint sees no difference where there is none (a separately built task, a loop-only key changed).
    base = baseline({})
    assert base.outcome is None, f"{case}: the shipped config does not run: {base.outcome}"
    assert base.first_difference(Run(apply(cfg, {"log_every": 7}, runs), tmp_path)) is None

    silent, crashed, not_walked = [], [], []
    import time
    T0 = time.perf_counter()
    for key in walked(case, runs):
        t0 = time.perf_counter()
        context = CONTEXT.get(key, {})
        context = context(cfg) if callable(context) else context
        before = baseline(context)
        if before.outcome is not None:
            not_walked.append(key)  # its setting is refused here: it cannot matter in this config
            continue
        start_cfg = apply(cfg, context, runs)
        value, new = leaves(start_cfg)[key], changed(key, start_cfg, runs)
        after = Run(apply(cfg, {**context, key: new}, runs), tmp_path)
        where = f"{key}={value!r}->{new!r}" + (f" (with {context})" if context else "")
        if after.outcome and after.outcome[0] == "crashed":
            crashed.append(f"{where}: {after.outcome[1][:300]}")
        elif before.first_difference(after) is None:
            silent.append(where)
        print(f"TIME {time.perf_counter()-t0:6.2f} {key} {before.first_difference(after) if not after.outcome else after.outcome[0]}", flush=True)
    print(f"TOTAL {time.perf_counter()-T0:6.2f}")
    assert not silent and not crashed, (
        f"{case} config: keys whose change leaves the run and validation as they were (read nowhere? refuse or use "
        f"them, or add them to ALLOW with a reason): {silent}; changes that crash instead of being refused: {crashed}")
