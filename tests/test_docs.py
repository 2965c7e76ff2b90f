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
        "prefopt.integrations.transformers",
        "prefopt.integrations.jax",
        "prefopt.losses.registry",
        "prefopt.layout",
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
    """Names with a ``::: name`` entry; ``backends.x`` (the source folder, which the docs
    build reads statically) stands for ``prefopt.backends.x``."""
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    names = {
        line.split(":::", 1)[1].strip() for line in text.splitlines() if line.startswith(":::")
    }
    return {"prefopt." + n if n.startswith("backends.") else n for n in names}


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


def test_readme_python_examples_run():
    import re

    readme = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    skip_unless_installed(*blocks)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize(
    "page",
    [
        "logps.md",
        "choosing.md",
        "metrics.md",
        "losses/group.md",
        "losses/kto.md",
        "training/trainer.md",
        "training/trl.md",
        "training/jax.md",
    ],
)
def test_docs_python_examples_run(page):
    import re

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    assert blocks, page
    skip_unless_installed(*blocks)
    for block in blocks:
        exec(compile(block, page, "exec"), {})
