"""Train state: parameters and their Adam moments are created sharded by the rules, `abstract` describes exactly
what `create` makes, and parameters given from another run take their place over a fresh initialisation."""

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_config

from llmjax import optim, sharding
from llmjax.models import heads, transformer
from llmjax.train import state
from tests.test_sharding import EXPECTED, specs_by_path


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(mesh=dict(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def mesh(cfg):
    return sharding.make_mesh(cfg.mesh)


def test_created_state_is_sharded(cfg, mesh):
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")  # compiles several times faster than threefry on CPU
    try:
        specs = transformer.specs(cfg.model)
        st = state.create(specs, cfg, mesh, optim.make(cfg, specs))
    finally:
        jax.config.update("jax_default_prng_impl", default_impl)
    assert specs_by_path(jax.tree.map(lambda a: a.sharding, st.params)) == EXPECTED
    for moment in ("mu", "nu"):
        assert specs_by_path(jax.tree.map(lambda a: a.sharding, optax.tree_utils.tree_get(st.opt_state, moment))) \
            == EXPECTED
    assert st.params["layers"]["w_gate"].addressable_shards[0].data.shape == (2, 32, 64)  # [L, D/fsdp, F/tensor]


def test_merge_puts_given_subtrees_over_fresh_ones():
    fresh = {"trunk": {"embed": 1, "layers": {"wq": 2, "wk": 3}}, "head": {"w": 4, "b": 5}}
    assert state.merge(fresh, {}) == fresh
    assert state.merge(fresh, {"trunk": {"layers": {"wq": 20}}}) == \
        {"trunk": {"embed": 1, "layers": {"wq": 20, "wk": 3}}, "head": {"w": 4, "b": 5}}
    assert state.merge(fresh, {"head": {"w": 40, "b": 50}}) == {**fresh, "head": {"w": 40, "b": 50}}
    with pytest.raises(ValueError, match=r"parameters \['value'\] have no place in this layout \(\['head', 'trunk'\]"):
        state.merge(fresh, {"trunk": {"embed": 10}, "value": {"w": 1}})
    with pytest.raises(ValueError, match=r"parameters \['wv'\] have no place in this layout \(\['wk', 'wq'\]\)"):
        state.merge(fresh, {"trunk": {"layers": {"wv": 1}}})


@pytest.fixture
def rbg_keys():
    """rbg random keys while a test runs: the init compiles several times faster than with threefry on CPU."""
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_default_prng_impl", default_impl)


def describe(tree) -> list:
    return [(a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(tree)]


def test_abstract_is_what_create_makes(cfg, mesh, rbg_keys):
    specs = transformer.specs(cfg.model)
    tx = optim.make(cfg, specs)
    extra = {"kl_coef": 0.1}
    made = state.create(specs, cfg, mesh, tx, extra=extra)
    target = state.abstract(specs, cfg, mesh, tx, extra=extra)
    assert jax.tree.structure(target) == jax.tree.structure(made)
    assert describe(target) == describe(made)


def test_given_parameters_are_kept_and_the_rest_is_fresh(cfg, mesh, rbg_keys):
    """A reward layout given a language model's parameters as its trunk: the trunk is exactly those (placed by the
    rules), the head is what a fresh start would have."""
    specs = heads.specs(cfg.model)
    tx = optim.make(cfg, specs)
    lm = jax.device_get(transformer.init_tree(transformer.specs(cfg.model), jax.random.key(7), "float32"))
    fresh = jax.device_get(state.create(specs, cfg, mesh, tx).params)
    st = state.create(specs, cfg, mesh, tx, given={"trunk": lm})
    assert not np.array_equal(fresh["trunk"]["embed"], lm["embed"])  # so the trunk can only have come from `given`
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(st.params["trunk"]), lm)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(st.params["head"]), fresh["head"])
    assert specs_by_path(jax.tree.map(lambda a: a.sharding, st.params["trunk"])) == EXPECTED
    assert int(st.step) == 0
