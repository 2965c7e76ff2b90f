"""The house has no import circle: each module of prefopt/ and backends/ (shipped as
prefopt.backends) imports only modules that do not import it back, function-local imports
included. A circle is what let the registry and the losses, or the core's ops and the JAX
kernel, each need the other loaded first."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, package in (("prefopt", "prefopt"), ("backends", "prefopt.backends")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return found


def imports(path: pathlib.Path, known: dict) -> set[str]:
    """The house modules ``path`` imports: ``from a import b`` counts ``a.b`` where that is
    a module, else ``a`` (a package's ``__init__``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known.keys()
            out |= subs
            if len(subs) < len(node.names) and node.module in known:
                out.add(node.module)
    return out


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, as the modules along it, or ``None``."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name)
        if found:
            return found
    return None


def test_no_module_of_the_house_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert "prefopt.losses.registry" in graph and "prefopt.backends.jax.ops" in graph
    assert circle(graph) is None, " -> ".join(circle(graph))


def test_the_circle_finder_finds_a_circle():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None
