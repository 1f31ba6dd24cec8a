"""The house's walls, read from the source: shared code never names an objective, objectives are siblings, and the
library's imports have no cycles and never reach a module that defines command-line flags on import.

An objective is its own file, llmjax/train/<name>.py, and one line of the registry: nothing else may know it by
name. "Naming" is what would need an edit for a new objective: reading cfg.trainer, comparing a string with an
objective's name, a key of an objective's config section ("ppo.tasks"), reading such a section off a config
(cfg.dpo), or importing an objective's module. Docstrings and comments may mention them.
"""

import ast
from pathlib import Path

import pytest

from llmjax.train import registry

LIBRARY = Path(__file__).resolve().parents[1] / "llmjax"
NAMES = {*registry.OBJECTIVES, "grpo"}  # GRPO is PPO's algorithm, named by ppo.algorithm
OWN = {f"train/{name}.py" for name in registry.OBJECTIVES} | {"train/registry.py"}
# The benchmarks of particular objectives' steps (python -m llmjax.bench dpo | ppo) time those objectives by name.
EXEMPT = {"bench.py": "benchmarks of the dpo and ppo steps, by name"}
SIBLINGS_MAY_IMPORT = {"loop", "step", "state", "common", "rollout"}  # rollout: the on-policy batch source


def modules() -> dict[str, Path]:
    return {str(p.relative_to(LIBRARY)): p for p in sorted(LIBRARY.rglob("*.py"))}


def docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def is_config(node: ast.AST) -> bool:
    """cfg, self.cfg, reward_cfg, ...: what holds a run's config."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name == "cfg" or name.endswith("_cfg")


def namings(tree: ast.AST) -> list[str]:
    """Where a module names an objective (see the module docstring)."""
    found, skip = [], docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "trainer" and isinstance(node.ctx, ast.Load):
            found.append(f"line {node.lineno}: reads .trainer")
        elif isinstance(node, ast.Attribute) and node.attr in NAMES and is_config(node.value):
            found.append(f"line {node.lineno}: reads the {node.attr} section of a config")
        elif isinstance(node, ast.Compare):
            strings = [c.value for side in (node.left, *node.comparators) for c in ast.walk(side)
                       if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            found += [f"line {node.lineno}: compares with {s!r}" for s in strings if s in NAMES]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if any(node.value.startswith(f"{name}.") for name in NAMES):
                found.append(f"line {node.lineno}: names the key {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if node.module.startswith("llmjax.train") and target.split(".")[-1] in registry.OBJECTIVES:
                    found.append(f"line {node.lineno}: imports {target}")
    return found


def test_the_check_sees_what_it_looks_for():
    code = ('if cfg.trainer == "ppo" or x in ("reward",):\n    k = cfg.dpo.beta\n'
            'key = "ppo.tasks"\nfrom llmjax.train import distill\n')
    assert len(namings(ast.parse(code))) == 6
    assert namings(ast.parse('"""ppo and dpo, in a docstring."""\nc.trainer = "pretrain"\nflag = "reward"\n')) == []


@pytest.mark.parametrize("path", [p for p in modules() if p not in OWN and p not in EXEMPT])
def test_shared_code_never_names_an_objective(path):
    assert namings(ast.parse(modules()[path].read_text())) == [], (
        f"llmjax/{path} names an objective: ask the objective (llmjax.train.common.Objective) or a run's parts "
        "instead")


def imported(path: Path) -> set[str]:
    """The llmjax modules a file imports when it is imported: its top-level imports (not those of its `if __name__
    == "__main__"` block, of `if TYPE_CHECKING`, or inside a function)."""
    names = set(modules())
    out = set()
    for n in ast.parse(path.read_text()).body:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("llmjax"):
            for alias in n.names:
                for dotted in (f"{n.module}.{alias.name}", n.module):
                    parts = dotted.split(".")[1:]
                    found = next((f for f in ("/".join(parts) + ".py", "/".join(parts) + "/__init__.py")
                                  if f in names), None)
                    if found:
                        out.add(found)
                        break
    return out - {str(path.relative_to(LIBRARY))}


@pytest.mark.parametrize("name", sorted(registry.OBJECTIVES))
def test_objectives_are_siblings(name):
    """An objective imports the loop, the step, the state, the common module and the on-policy batch source of
    llmjax.train; never another objective, nor the registry."""
    own = {p.removeprefix("train/").removesuffix(".py") for p in imported(LIBRARY / "train" / f"{name}.py")
           if p.startswith("train/")}
    assert own <= SIBLINGS_MAY_IMPORT, f"{name} imports {sorted(own - SIBLINGS_MAY_IMPORT)}"


def test_imports_have_no_cycles_and_libraries_define_no_flags():
    graph = {path: imported(p) for path, p in modules().items()}
    state: dict[str, int] = {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        for v in graph[u]:
            assert state.get(v) != 1, f"import cycle: {' -> '.join([*stack[stack.index(v):], v])}"
            if v not in state:
                visit(v, [*stack, v])
        state[u] = 2

    for u in graph:
        if u not in state:
            visit(u, [u])
    flagged = {path for path, p in modules().items()
               if any(isinstance(n, ast.Expr | ast.Assign) and "flags.DEFINE" in ast.unparse(n)
                      for n in ast.parse(p.read_text()).body)}
    for path, deps in graph.items():
        assert not deps & flagged, f"llmjax/{path} imports {sorted(deps & flagged)}, which define flags on import"
