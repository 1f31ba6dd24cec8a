"""Knowledge distillation: a student learns a frozen teacher's token distributions.

The teacher is any run or Hugging Face folder holding a language model (distill.teacher) that reads the same
tokenizer and vocabulary; it may be larger. At every scored token the loss is a divergence between the teacher's
and the student's next-token distributions at distill.temperature (llmjax.losses.distill: forward KL, reverse KL,
or GKD's generalised JSD with distill.beta), plus distill.ce_weight times the data's cross-entropy. The tokens
come from the data source (off-policy: supervised KD), or with distill.on_policy from the student's own answers
to prompt records, sampled each step from the current student (GKD, Agarwal et al. 2024: the student learns
where its own mistakes take it). The teacher is a frozen argument of the step, sharded like the student.

Parameters: a language model, fresh or from cfg.init_from.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import losses, metrics, runs, sampling
from llmjax.config import check_ranges
from llmjax.data import mixture, prompts, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.evaluate import make_evaluator
from llmjax.models import moe, transformer
from llmjax.sharding import Constrain
from llmjax.train.common import Batch, Context, Definition, Objective, lm_flops, tokens
from llmjax.train.rollout import encode, rows_of


def loss_fn(params, batch: Batch, teacher, cfg, teacher_model, constrain: Constrain) -> tuple[jax.Array, dict]:
    d = cfg.distill
    args = batch["inputs"], batch["positions"], batch["segment_ids"]
    out = transformer.forward(params, *args, cfg.model, constrain)
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size  # an embedding padded past the tokenizer: never a target
    student_BTV = sampling.limit_vocab(out.logits_BTV, vocab)
    teacher_BTV = sampling.limit_vocab(transformer.forward(teacher, *args, teacher_model, constrain).logits_BTV, vocab)
    loss, aux = losses.distill(student_BTV, teacher_BTV, batch["loss_mask"], d.divergence, d.beta, d.temperature)
    if d.ce_weight:
        ce = losses.cross_entropy(out.logits_BTV, batch["targets"], batch["loss_mask"])[0]
        loss, aux = loss + d.ce_weight * ce, aux | {"ce": ce}
    router_loss, router = moe.loss(out.moe, cfg.model)
    return loss + router_loss, aux | router


def teacher_config(cfg):
    try:
        return runs.run_config(cfg.distill.teacher)
    except (OSError, ValueError) as e:
        raise LlmjaxError(f"distill.teacher={cfg.distill.teacher!r} is not a run or hf:DIR ({e}); pass the workdir "
                          "of a trained language model") from None


RANGES = {
    "distill.beta": ("(0, 1)", "the JSD's mixture weight of the teacher; at 0 or 1 the JSD is zero"),
    "distill.temperature": ("(0, inf)", "both distributions' softmax temperature; it divides the logits"),
    "distill.ce_weight": ("[0, inf)", "the weight of the data's cross-entropy; below 0 it unlearns the data"),
    "distill.max_new_tokens": ("[1, inf)", "tokens per on-policy answer at most"),
    "distill.max_prompt_len": ("[1, inf)", "the on-policy prompts' padded width in tokens"),
}


def validate(cfg, sizes: dict[str, int]) -> None:
    if "distill" not in cfg:
        raise LlmjaxError("a distill run needs the distill section; start from configs/distill.py")
    d = cfg.distill
    check_ranges(cfg, RANGES)
    if cfg.loss.z_loss:
        raise LlmjaxError("loss.z_loss applies to next-token training only; set --config.loss.z_loss=0")
    if d.divergence not in losses.DIVERGENCES:
        raise LlmjaxError(f"distill.divergence={d.divergence!r}: choose one of {', '.join(losses.DIVERGENCES)}")
    teacher = teacher_config(cfg)
    if teacher.data.tokenizer != cfg.data.tokenizer or teacher.model.vocab_size != cfg.model.vocab_size:
        raise LlmjaxError(f"distill.teacher={d.teacher!r} reads data.tokenizer={teacher.data.tokenizer!r} with "
                          f"model.vocab_size={teacher.model.vocab_size}, the student {cfg.data.tokenizer!r} with "
                          f"{cfg.model.vocab_size}: their distributions are over other tokens; distill from a teacher "
                          "of the same tokenizer and vocabulary")
    if d.on_policy:
        if d.ce_weight:
            raise LlmjaxError(f"distill.ce_weight={d.ce_weight}: on-policy tokens are the student's own answers, not "
                              "data to imitate; set --config.distill.ce_weight=0 or distill.on_policy=False")
        if d.max_prompt_len + d.max_new_tokens > cfg.model.max_seq_len:
            raise LlmjaxError(f"distill.max_prompt_len + distill.max_new_tokens = "
                              f"{d.max_prompt_len + d.max_new_tokens} exceeds model.max_seq_len="
                              f"{cfg.model.max_seq_len}; lower one of them")
        if d.tasks:
            tasks.check_names("distill.tasks", d.tasks)


def flops_per_token(cfg) -> float:
    """The student's forward and backward and the teacher's forward on each token; on-policy also the student's
    forward that sampled it."""
    t = teacher_config(cfg).model
    teacher = metrics.flops_per_token(transformer.matmul_param_count(t), t.n_layers, cfg.seq_len,
                                      t.n_heads * t.head_dim) / 3
    return lm_flops(cfg) + teacher + (lm_flops(cfg, forward=True) if cfg.distill.on_policy else 0)


class OnPolicy:
    """The student's own answers to step s's prompt records as next-token rows, the loss mask on the answer (its eos
    included), sampled at temperature 1 from the current parameters: the batch source (state, step) -> (batch,
    metrics). Prompts are left-padded to distill.max_prompt_len, one shape, so the sampler compiles once."""

    def __init__(self, ctx: Context):
        cfg, d = ctx.cfg, ctx.cfg.distill
        self.cfg, self.sharding = cfg, ctx.sharding
        self.tokenizer = tok = get_tokenizer(cfg.data.tokenizer)
        self.prompts = prompts.source(cfg, 1, d.tasks)
        self._generate = sampling.sampler(cfg.model, max_new_tokens=d.max_new_tokens, eos_id=tok.eos_id,
                                          pad_id=tok.pad_id, temperature=1.0, vocab_size=tok.vocab_size,
                                          constrain=ctx.constrain)
        self._rows = jax.jit(lambda ids, lengths, out: rows_of(ids, lengths, out, tok.eos_id, False)[0],
                             out_shardings=ctx.sharding)

    def encode(self, records: list[dict]) -> tuple[jax.Array, jax.Array]:
        return encode(self.tokenizer, records, self.cfg.distill.max_prompt_len, "distill.max_prompt_len",
                      self.sharding)

    def __call__(self, state, step: int) -> tuple[dict, dict]:
        ids, lengths = self.encode(self.prompts(step))
        out = self._generate(state.params, ids, lengths, jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step))
        batch = self._rows(ids, lengths, out)
        return {k: v for k, v in batch.items() if k != "old_logp"}, {
            "response_length": jnp.mean(out["lengths"].astype(jnp.float32))}


def define(ctx: Context) -> Definition:
    cfg, teacher_model = ctx.cfg, teacher_config(ctx.cfg).model
    teacher = ctx.read(cfg.distill.teacher, "lm", "distill.teacher", teacher_model)()
    loss = partial(loss_fn, cfg=cfg, teacher_model=teacher_model, constrain=ctx.constrain)
    if cfg.distill.on_policy:
        iterator, source = None, OnPolicy(ctx)
    else:
        iterator, batches = mixture.batches(cfg, ctx.sharding)
        source = lambda _, i: batches(i)  # noqa: E731
    evaluate = None
    if cfg.eval_every:
        on_prompts = cfg.distill.on_policy and cfg.data.source != "synthetic"  # prompt records: no text to score
        held_out = [] if on_prompts else [b for rows in mixture.held_out(cfg, ctx.sharding, 4).values() for b in rows]
        divergence = jax.jit(lambda params, b: loss(params, b, teacher)[1]["divergence"])
        evaluate_lm = make_evaluator(cfg, ctx.mesh, ctx.constrain, n=cfg.eval_prompts, on_prompts=on_prompts)

        def evaluate(params) -> dict[str, float]:
            """The student's evaluation, and its divergence from the teacher on held-out rows (where the data has
            any: a source of prompt records has answers to check instead)."""
            out = evaluate_lm(params)
            if held_out:
                out["divergence_to_teacher"] = float(np.mean(jax.device_get([divergence(params, b) for b in held_out])))
            return out

    start = ctx.read(cfg.init_from, "lm", "distillation's student") if cfg.init_from else lambda: None
    return Definition(loss=loss, source=source, weight=tokens, start=start, frozen=(teacher,), evaluate=evaluate,
                      data_iterator=iterator)


OBJECTIVE = Objective("distill", define, validate, layout=lambda cfg: transformer.specs(cfg.model),
                      flops_per_token=flops_per_token, parts={"lm": ()})
