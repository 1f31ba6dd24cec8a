"""Config mistakes are caught before anything compiles, each as one line naming the key and the fix."""

import re

import pytest
from helpers import tiny_config

from configs import ppo as ppo_config
from configs import pretrain as pretrain_config
from llmjax import config
from llmjax.train import registry


def test_parse_arg_converts_types():
    args = config.parse_arg(" steps=5, ,lr=0.5,on=yes,off=false", model="small", steps=300, lr=1.0, on=False,
                            off=True)
    assert args.to_dict() == dict(model="small", steps=5, lr=0.5, on=True, off=False)
    assert type(args.steps) is int and type(args.lr) is float


@pytest.mark.parametrize("arg, message", [
    ("modle=tiny", "config argument 'modle' is unknown; valid keys: model, steps"),
    ("model", "config argument 'model' is not k=v"),
    ("steps=many", "config argument steps='many' is not a int"),
    ("flag=ture", "config argument flag='ture' is not a bool"),
])
def test_parse_arg_rejects(arg, message):
    with pytest.raises(config.LlmjaxError, match=message):
        config.parse_arg(arg, model="small", steps=300, flag=False)


@pytest.mark.parametrize("arg, reward, steps, lr, schedule, kl_coef, value", [
    ("", "runs/rm", 60, 3e-5, "constant", 0.2, "separate"),            # a reward model: gently
    ("reward=/runs/rm", "/runs/rm", 60, 3e-5, "constant", 0.2, "separate"),
    ("reward=tasks", "tasks", 700, 2e-4, "cosine", 0.05, "shared"),    # a verifier: harder, annealed
    ("reward=math,algorithm=grpo", "math", 900, 2e-4, "cosine", 0.05, "shared"),
    ("reward=tasks,steps=7", "tasks", 7, 2e-4, "cosine", 0.05, "shared"),
])
def test_ppo_config_tunes_to_what_judges_the_answers(arg, reward, steps, lr, schedule, kl_coef, value):
    cfg = ppo_config.get_config(arg)
    assert (cfg.ppo.reward, cfg.steps, cfg.optim.lr, cfg.optim.schedule, cfg.ppo.kl_coef, cfg.ppo.value) == (
        reward, steps, lr, schedule, kl_coef, value)


def test_config_file_rejects_unknown_preset():
    with pytest.raises(config.LlmjaxError, match="model='nope' is not a preset; choose one of tiny"):
        pretrain_config.get_config("model=nope")


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.fsdp": 3}, r"has 3 devices but 8 are present; .* --config.mesh.fsdp=-1"),
    ({"mesh.fsdp": 3, "mesh.data": -1}, r"8 devices are not divisible by 3"),
    ({"mesh.fsdp": -1, "mesh.data": -1}, r"at most one -1"),
    ({"batch_size": 12}, r"batch_size=12 is not divisible by data\*expert\*fsdp\*grad_accum=1\*1\*8\*1; use a "
                         r"multiple of 8"),
    ({"optim.grad_accum": 3}, r"batch_size=8 .*=1\*1\*8\*3; use a multiple of 24"),
    ({"model.n_kv_heads": 3}, r"model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    ({"mesh.tensor": 4}, r"model.n_kv_heads=2 is not divisible by mesh.tensor=4"),
    ({"seq_len": 512}, r"seq_len=512 is longer than model.max_seq_len=256; lower --config.seq_len"),
    ({"optim.warmup_steps": 30}, r"steps=20, optim.warmup_steps=30"),
    ({"optim.warmup_steps": -1}, r"need 0 <= warmup_steps <= steps"),
    ({"optim.grad_accum": 0}, r"optim.grad_accum=0 must be at least 1"),
    ({"log_every": 0}, r"log_every=0 must be at least 1"),
    ({"model.norm": "rmsnorm"}, r"model.norm='rmsnorm' is not one of \('rms', 'layer'\); set --config.model.norm"),
    ({"rules.embed": "fsdb"}, r"rules.embed='fsdb' names mesh axes \['fsdb'\]"),
    ({"data.tasks": "sort,srot"}, r"data.tasks='sort,srot' names unknown tasks \['srot'\]; choose from reverse,"),
])
def test_validate_rejects(overrides, message):
    with pytest.raises(config.LlmjaxError, match=message):
        registry.validate(tiny_config(**overrides), 8)


@pytest.mark.parametrize("overrides, n_devices, sizes", [
    ({}, 8, dict(data=1, expert=1, fsdp=8, context=1, tensor=1)),
    ({"mesh.tensor": 2}, 8, dict(data=1, expert=1, fsdp=4, context=1, tensor=2)),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, 8, dict(data=2, expert=1, fsdp=2, context=1, tensor=2)),
    ({"mesh.expert": 2, "mesh.tensor": 2}, 8, dict(data=1, expert=2, fsdp=2, context=1, tensor=2)),
    ({"mesh.context": 4}, 8, dict(data=1, expert=1, fsdp=2, context=4, tensor=1)),
    ({}, 1, dict(data=1, expert=1, fsdp=1, context=1, tensor=1)),
])
def test_validate_accepts_and_resolves_mesh(overrides, n_devices, sizes):
    assert registry.validate(tiny_config(**overrides), n_devices) == sizes


def shipped(spec: str, **overrides):
    """A shipped config on the tiny model, with dotted-key overrides."""
    return config.load(f"configs/{spec}", **overrides)


# (config, key, a value outside what its maths allows): each refused naming the key and its interval.
OUT_OF_RANGE = [
    ("pretrain.py", "optim.lr", 0.0), ("pretrain.py", "optim.lr", -3e-4), ("pretrain.py", "optim.min_lr_ratio", 1.5),
    ("pretrain.py", "optim.b1", 1.0), ("pretrain.py", "optim.b2", -0.1), ("pretrain.py", "optim.eps", 0.0),
    ("pretrain.py", "optim.weight_decay", -0.1), ("pretrain.py", "optim.clip_norm", 0.0),
    ("pretrain.py", "loss.z_loss", -1e-4), ("pretrain.py", "data.validation", 1.5),
    ("pretrain.py", "data.validation", -0.1), ("pretrain.py", "model.norm_eps", 0.0),
    ("pretrain.py", "model.init_std", -0.02), ("pretrain.py", "eval_prompts", 0),
    ("pretrain.py", "eval_every", -1), ("pretrain.py", "peak_flops", -1.0),
    ("dpo.py", "dpo.beta", 0.0), ("dpo.py", "dpo.beta", -0.1), ("dpo.py", "dpo.label_smoothing", 0.5),
    ("dpo.py", "dpo.label_smoothing", -0.1), ("dpo.py", "dpo.nll_weight", -1.0),
    ("reward.py", "reward.margin", -0.5),
    ("ppo.py", "ppo.clip_low", 0.0), ("ppo.py", "ppo.clip_low", 1.5), ("ppo.py", "ppo.clip_high", 0.0),
    ("ppo.py", "ppo.value_clip_eps", -0.2), ("ppo.py", "ppo.vf_coef", -0.1), ("ppo.py", "ppo.max_prompt_len", 0),
    ("ppo.py", "ppo.overlong_buffer", -1),
    ("ppo.py", "ppo.entropy_coef", -0.01), ("ppo.py", "ppo.kl_coef", -0.2), ("ppo.py", "ppo.target_kl", -1.0),
    ("ppo.py", "ppo.kl_horizon", 0), ("ppo.py", "ppo.gamma", 1.5), ("ppo.py", "ppo.lam", -0.5),
    ("ppo.py", "ppo.temperature", 0.0), ("ppo.py", "ppo.epochs", 0), ("ppo.py", "ppo.minibatches", 0),
    ("ppo.py", "ppo.max_new_tokens", 0),
]


@pytest.mark.parametrize("spec, key, value", OUT_OF_RANGE)
def test_validate_refuses_values_the_maths_forbids(spec, key, value):
    with pytest.raises(config.LlmjaxError, match=rf"^{re.escape(f'{key}={value!r} is outside ')}[\[(].*"
                                                 rf"; set --config\.{re.escape(key)} within it$"):
        registry.validate(shipped(f"{spec}:model=tiny", **{key: value}), 8)


@pytest.mark.parametrize("spec, overrides", [
    ("pretrain.py", {"optim.min_lr_ratio": 1.0, "optim.b1": 0.0, "optim.weight_decay": 0.0, "data.validation": 0.0,
                     "eval_every": 0, "optim.lr": 1e-9}),
    ("dpo.py", {"dpo.label_smoothing": 0.49, "dpo.beta": 1e-6}),
    ("ppo.py", {"ppo.gamma": 1.0, "ppo.lam": 0.0, "ppo.kl_coef": 0.0, "ppo.vf_coef": 0.0, "ppo.target_kl": 0.0}),
])
def test_validate_accepts_the_ends_of_each_range(spec, overrides):
    registry.validate(shipped(f"{spec}:model=tiny", **overrides), 8)
