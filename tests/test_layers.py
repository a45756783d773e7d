"""The import rule, checked over every module of the project (ast, so lazy imports inside functions and
module names passed as strings to `import_module` or kept in registries count too):

    tokenizer_vision  <-  mllm  <-  training, eval, serve  <-  demo

A package imports only from the layers below it; training, eval and serve never import each other. The
`mllm` command (mllm/cli.py and mllm/commands/) sits on top of everything and nothing imports it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"tokenizer_vision": 0, "mllm": 1, "training": 2, "eval": 2, "serve": 2, "demo": 3}
COMMAND = ("mllm.cli", "mllm.commands")  # the entry point: above every layer


def _modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _project_module(name: str) -> str | None:
    """The longest project module that `name` (a dotted import target) is or lies in."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _imports(module: str, path: Path) -> dict[str, int]:
    """{imported project module: line} for every import in the file, wherever it stands."""
    found: dict[str, int] = {}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # import_module("x.y"), registries of "x.y" or "x.y:function" strings
            text = node.value.split(":", 1)[0]
            if text.count(".") >= 1 and text.split(".")[0] in LAYERS and " " not in text:
                targets = [text]
        for target in targets:
            resolved = _project_module(target)
            if resolved and resolved != module:
                found.setdefault(resolved, node.lineno)
    return found


def _is_command(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in COMMAND)


def _layer(module: str) -> int:
    return 9 if _is_command(module) else LAYERS[module.split(".")[0]]


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_walk_sees_lazy_and_string_imports():
    # mllm/cli.py names its commands by string; the commands import the layers inside run().
    assert "mllm.commands.train" in GRAPH["mllm.cli"]
    assert any(target.startswith("training") for target in GRAPH["mllm.commands.train"])
    assert "demo" in GRAPH["mllm.commands.demo"] or "demo.pipeline" in GRAPH["mllm.commands.demo"]


def _problems(graph: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for module, imported in graph.items():
        for target, line in imported.items():
            if _is_command(target) and not _is_command(module):
                problems.append(f"{module}:{line} imports the command line ({target})")
                continue
            if _is_command(module):
                continue
            same_package = target.split(".")[0] == module.split(".")[0]
            if not same_package and _layer(target) >= _layer(module):
                problems.append(f"{module}:{line} imports {target} (layer {_layer(target)} >= {_layer(module)})")
    return problems


def test_no_upward_or_sideways_import():
    problems = _problems(GRAPH)
    assert not problems, "\n".join(problems)


def test_the_rule_catches_upward_sideways_and_command_imports(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("import importlib\n\ndef f():\n    from training.recipes import run_recipe\n"
                      "    importlib.import_module('serve.app')\n    import mllm.commands.demo\n")
    graph = {"mllm.vocab": _imports("mllm.vocab", source), "eval.runner": {"training.recipes": 1},
             "demo.pipeline": {"training.recipes": 1, "eval.runner": 2}}
    problems = _problems(graph)
    assert any("mllm.vocab:4 imports training.recipes" in p for p in problems)
    assert any("mllm.vocab:5 imports serve.app" in p for p in problems)
    assert any("imports the command line (mllm.commands.demo)" in p for p in problems)
    assert any(p.startswith("eval.runner:1 imports training.recipes") for p in problems)
    assert not any(p.startswith("demo.pipeline") for p in problems)


def test_no_import_cycle_between_modules():
    # Module-level imports only: a cycle there is a real import cycle (or a hidden order dependency).
    top_level = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        names = []
        for node in tree.body:
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        top_level[module] = {t for n in names if (t := _project_module(n)) and t != module}

    def parents(module: str) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)

    edges = {m: (targets | set().union(*(parents(t) for t in targets))) - {m} for m, targets in top_level.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1 and not module.startswith(target + "."):
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)
