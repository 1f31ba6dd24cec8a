import re

import jax
import pytest
from helpers import tiny_config
from jax.sharding import PartitionSpec as P

from llmjax import config, sharding
from llmjax.models import transformer

# The tiny model's parameters on a (data=2, fsdp=2, tensor=2) mesh under the base rules: embed -> fsdp;
# vocab, heads, kv_heads, mlp -> tensor; layers, head_dim -> replicated.
EXPECTED = {
    "embed": P("tensor", "fsdp"),
    "unembed": P("fsdp", "tensor"),
    "final_norm/scale": P("fsdp"),
    "layers/attn_norm/scale": P(None, "fsdp"),
    "layers/mlp_norm/scale": P(None, "fsdp"),
    "layers/wq": P(None, "fsdp", "tensor", None),
    "layers/wk": P(None, "fsdp", "tensor", None),
    "layers/wv": P(None, "fsdp", "tensor", None),
    "layers/wo": P(None, "tensor", None, "fsdp"),
    "layers/w_gate": P(None, "fsdp", "tensor"),
    "layers/w_up": P(None, "fsdp", "tensor"),
    "layers/w_down": P(None, "tensor", "fsdp"),
}


def specs_by_path(tree):
    return {"/".join(k.key for k in path): leaf.spec
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "spec"))[0]}


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(mesh=dict(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def mesh(cfg):
    return sharding.make_mesh(cfg.mesh)


def test_make_mesh_fills_minus_one():
    want = dict(data=1, expert=1, fsdp=4, context=1, tensor=2)
    assert dict(sharding.make_mesh(dict(data=1, fsdp=-1, tensor=2)).shape) == want


@pytest.mark.parametrize("mesh_cfg", [dict(data=2, expert=1, fsdp=2, context=1, tensor=1),
                                      dict(data=3, expert=1, fsdp=-1, context=1, tensor=1)])
def test_make_mesh_rejects_wrong_sizes(mesh_cfg):
    with pytest.raises(config.LlmjaxError, match=re.escape(f"mesh {mesh_cfg}")):
        sharding.make_mesh(mesh_cfg)


def test_param_shardings_follow_rules(cfg, mesh):
    assert specs_by_path(sharding.tree_shardings(transformer.specs(cfg.model), cfg.rules, mesh)) == EXPECTED


def test_spec_replicates_indivisible_dims(cfg, mesh):
    assert sharding.spec(("vocab", "embed"), cfg.rules, mesh, (50257, 768)) == P(None, "fsdp")
    assert sharding.spec(("vocab", "embed"), cfg.rules, mesh, (50258, 768)) == P("tensor", "fsdp")
    gpt2 = sharding.tree_shardings(transformer.specs(config.model_config("gpt2-124m")), cfg.rules, mesh)
    assert gpt2["embed"].spec == P(None, "fsdp")


def test_batch_spec_and_process_rows(cfg, mesh):
    batch = sharding.batch_sharding(mesh, cfg.rules)
    assert batch.spec == P(("data", "fsdp"))
    assert sharding.process_rows(batch, (8, 64)) == range(0, 8)


def test_activations_split_along_the_sequence_over_context(cfg, mesh):
    """The base rules put activations' sequence on the context axis: split with context > 1, whole without."""
    context = sharding.make_mesh(dict(fsdp=2, context=2, tensor=2))
    assert sharding.spec(("batch", "seq", "act_embed"), cfg.rules, context) == P("fsdp", "context", None)
    assert sharding.spec(("batch", "seq", "act_embed"), cfg.rules, mesh) == P(("data", "fsdp"), None, None)
