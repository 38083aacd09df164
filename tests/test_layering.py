"""The one-way layering, read from the source: kernels/ <- flash/ <- weights/ <- scripts.

Every import statement in the project's code (module level or inside a function: a lazy import still counts)
is resolved to a project module and checked: a module never imports a higher layer, nothing imports a script
(train.py, sample.py, eval.py, the recipes and benchmarks are entry points, not libraries), and the module
graph has no cycle. A failure names the file, the line and the import."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"kernels": 0, "flash": 1, "weights": 2}
SCRIPT = 3                      # top-level *.py, recipes/, bench/


def project_modules(root):
    """{dotted name: path} of every module of the project (tests excluded)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests", ".venv", "data") or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def layer_of(name):
    top = name.split(".")[0]
    return LAYERS.get(top, SCRIPT)


def is_script(name):
    return layer_of(name) == SCRIPT


def imports_of(path, mods):
    """[(line, imported project module)] of one file; `from pkg import name` counts as pkg.name when that is a
    module of its own, else as pkg."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                       for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` names the deepest project module it reaches
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and (node.lineno, t) not in found:
                found.append((node.lineno, t))
    return found


def violations(root):
    """Every upward import, import of a script, and import cycle under `root`, one line each."""
    mods = project_modules(root)
    problems, graph = [], {}
    for name, path in mods.items():
        where = path.relative_to(root)
        graph[name] = set()
        for line, target in imports_of(path, mods):
            if target == name:
                continue
            graph[name].add(target)
            if is_script(target):
                problems.append(f"{where}:{line}: imports the script {target} (nothing imports a script)")
            elif layer_of(target) > layer_of(name):
                problems.append(f"{where}:{line}: imports {target}, a higher layer (kernels <- flash <- weights "
                                f"<- scripts)")
    # cycles: a depth-first search that reports each back edge with the loop it closes
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                loop = stack[stack.index(m):] + [m]
                problems.append("import cycle: " + " -> ".join(loop))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            visit(n)
    return problems


def test_project_layering():
    problems = violations(ROOT)
    assert not problems, "\n".join(problems)


def write(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"flash/a.py": "from weights.b import x\n", "weights/b.py": "x = 1\n"},
     "flash/a.py:1: imports weights.b, a higher layer"),
    ({"kernels/k.py": "def f():\n    import flash.a\n", "flash/a.py": ""},       # a lazy import counts
     "kernels/k.py:2: imports flash.a, a higher layer"),
    ({"eval.py": "from sample import Parser\n", "sample.py": "Parser = 1\n"},
     "eval.py:1: imports the script sample"),
    ({"flash/a.py": "from flash import b\n", "flash/b.py": "def f():\n    from flash.a import g\n"},
     "import cycle: flash.a -> flash.b -> flash.a"),
])
def test_checker_names_each_violation(tmp_path, files, expected):
    """The checker itself: each kind of violation in a made-up tree is reported, with file and line."""
    write(tmp_path, files)
    problems = violations(tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_checker_accepts_downward_imports(tmp_path):
    write(tmp_path, {"kernels/__init__.py": "from kernels.k import f\n", "kernels/k.py": "def f(): pass\n",
                     "flash/__init__.py": "", "flash/m.py": "import kernels\nx = 1\n",
                     "weights/w.py": "from flash.m import x\nimport kernels.k\n", "train.py": "import weights.w\n"})
    assert violations(tmp_path) == []
