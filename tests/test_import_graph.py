"""The module graph of refit has no cycle, counting every import a module makes when it runs, those
inside functions included (only ``if TYPE_CHECKING:`` blocks, which never run, are left out)."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refit")


def _modules():
    mods = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = "refit." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _type_checking(node):
    test = node.test
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _imports(path, module, mods):
    """The refit modules that ``module`` (at ``path``) imports when it runs."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            names = []
        found.update(n for n in names if n in mods and n != module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(open(path, encoding="utf-8").read()))
    return found


def _cycle(graph):
    """One cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def dfs(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = dfs(w)
                if found:
                    return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = dfs(v)
            if found:
                return found
    return None


def test_the_module_graph_of_refit_has_no_cycle():
    mods = _modules()
    graph = {m: _imports(p, m, mods) for m, p in mods.items()}
    assert len(graph) > 20 and graph["refit.posttrain.trainer"]  # the scan sees the package
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_scan_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    src = "def f():\n    from .b import x\n"
    tree_mods = {"refit.a": None, "refit.b": None}
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src + "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import y\n")
    try:
        assert _imports(f.name, "refit.a", {**tree_mods, "refit.c": None}) == {"refit.b"}
    finally:
        os.unlink(f.name)


def test_the_former_module_names_still_import_the_same_objects():
    """Code written against the former modules keeps working: ``refit.trainer`` and ``refit.runs`` hand out
    the objects of ``refit.posttrain`` and ``refit.runtime.runs`` themselves (README showed both)."""
    import refit.posttrain as posttrain
    import refit.posttrain.common as common
    import refit.runs as runs
    import refit.runtime.runs as runtime_runs
    import refit.trainer as trainer

    for name in ("FinetuneConfig", "ReFiT", "finetune", "load_policy"):
        assert getattr(trainer, name) is getattr(posttrain, name)
    for name in ("Baseline", "group_weights", "rating_weights", "reinforce_loss", "trajectory_logprob"):
        assert getattr(trainer, name) is getattr(common, name)
    for name in ("load_checkpoint", "save_checkpoint", "RunDir"):
        assert getattr(runs, name) is getattr(runtime_runs, name)
