"""Every public symbol has a docstring and an entry in the API reference."""

import inspect
import pathlib

import pytest

import prefopt
from tests.cases import skip_unless_installed

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def public_symbols():
    modules = {"prefopt": prefopt, "prefopt.metrics": prefopt.metrics}
    for name in (
        "prefopt.backends.torch",
        "prefopt.backends.jax",
        "prefopt.integrations.data",
        "prefopt.integrations.loss",
        "prefopt.integrations.transformers",
        "prefopt.integrations.attention",
        "prefopt.integrations.trl",
        "prefopt.integrations.jax",
        "prefopt.integrations.flax_llama",
        "prefopt.integrations.tunix",
        "prefopt.losses.registry",
        "prefopt.layout",
        "prefopt.cli.config",
        "prefopt.cli.models",
        "prefopt.cli.train",
    ):
        try:
            modules[name] = __import__(name, fromlist=["_"])
        except ImportError:
            continue
    return [
        (path, name, getattr(module, name))
        for path, module in modules.items()
        for name in module.__all__
    ]


def documented():
    """Names with a ``::: name`` entry."""
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    return {line.split(":::", 1)[1].strip() for line in text.splitlines() if line.startswith(":::")}


@pytest.mark.parametrize(
    "path,name,obj", public_symbols(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_public_symbol_is_documented(path, name, obj):
    assert f"{path}.{name}" in documented(), f"{path}.{name} has no '::: {path}.{name}' in docs/"
    doc = inspect.getdoc(obj)
    assert doc and len(doc.splitlines()) >= 3, f"{path}.{name} needs a real docstring"


LOSS_FUNCTIONS = sorted(
    {prefopt.get_loss(n).__name__ for n in prefopt.available_losses()}
    | {"mpo_split", "kto_kl", "combine_losses", "group_pairwise_loss", "batch_loss"}
)


@pytest.mark.parametrize("name", LOSS_FUNCTIONS)
def test_loss_docstrings_carry_formula_shapes_defaults_and_citation(name):
    doc = inspect.getdoc(getattr(prefopt, name))
    for section in ("Args:", "Returns:", "References:", "arXiv:"):
        assert section in doc, f"{name}: docstring lacks {section!r}"
    assert "$" in doc, f"{name}: docstring lacks its formula"
    assert "(B" in doc, f"{name}: docstring lacks the shapes"
    assert "Default" in doc, f"{name}: docstring lacks the defaults"


def test_every_registered_name_is_in_the_choosing_table():
    table = (DOCS / "choosing.md").read_text()
    for name in prefopt.available_losses():
        assert f"`{name}`" in table.split("Rules of thumb")[0], name


def test_import_prefopt_imports_only_numpy_and_array_api_compat():
    import subprocess
    import sys

    code = (
        "import sys; before = set(sys.modules); import prefopt; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(' '.join(sorted(new - set(sys.stdlib_module_names))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "prefopt" in out.stdout.split()
    assert set(out.stdout.split()) <= {"array_api_compat", "numpy", "prefopt"}, out.stdout


def run_block(block, where):
    """Run a code block as a reader would: a script, or a doctest session if it is one."""
    if block.lstrip().startswith(">>>"):
        import doctest

        test = doctest.DocTestParser().get_doctest(block, {}, where, where, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.failures == 0, f"{where}: a doctest block failed (output above)"
    else:
        exec(compile(block, where, "exec"), {})


def test_readme_python_examples_run():
    import re

    readme = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    skip_unless_installed(*blocks)
    for block in blocks:
        run_block(block, "README.md")


PAGES = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in (DOCS / p).read_text()])
def test_docs_python_examples_run(page):
    import re

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    assert blocks, page
    skip_unless_installed(*blocks)
    for block in blocks:
        run_block(block, page)


def test_install_commands_name_the_distribution():
    import re
    import shlex

    name = re.search(r'^name = "(.+)"$', (DOCS.parent / "pyproject.toml").read_text(), re.M)[1]
    assert name != "prefopt"  # the name on the package index belongs to another project
    texts = {"README.md": (DOCS.parent / "README.md").read_text()}
    texts.update({p: (DOCS / p).read_text() for p in PAGES})
    named = 0
    for where, text in texts.items():
        for command in re.findall(r"pip install ([^\n#`]*)", text):
            for token in shlex.split(command):
                if token.startswith("prefopt"):
                    assert token.split("[")[0] == name, (where, command)
                    named += 1
    assert named >= 3


def test_every_example_script_is_on_the_examples_page():
    page = (DOCS / "examples.md").read_text()
    scripts = sorted(p.name for p in (DOCS.parent / "examples").glob("*.py"))
    missing = [s for s in scripts if f'--8<-- "examples/{s}"' not in page or f"## {s}" not in page]
    assert scripts and not missing, f"examples missing from docs/examples.md: {missing}"


def test_every_public_symbol_is_in_the_api_index():
    page = (DOCS / "api.md").read_text()
    missing = [f"{p}.{n}" for p, n, _ in public_symbols() if f"[`{n}`][{p}.{n}]" not in page]
    assert not missing, f"no row in docs/api.md's index: {missing}"
