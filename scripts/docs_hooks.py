"""MkDocs hooks: an offline site, and API headings under the installed names.

- MathJax comes from the pinned Python package ``django-static-mathjax`` (MathJax's own
  release files; the package has no dependencies) and is served with the site: the built
  site loads no script, style or font from another host.
- The API reference documents ``prefopt.backends.*``: ``backends/`` sits at the top of the
  repository and ships as ``prefopt.backends`` (see pyproject.toml), so the docs build reads
  the sources from a copy laid out as the wheel lays them out.
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
API_SOURCES = ROOT / ".docs-build" / "api"  # mkdocs.yml's mkdocstrings paths point here
MATHJAX = "assets/mathjax/tex-svg.js"  # mkdocs.yml's extra_javascript names this path


def stage_api_sources() -> None:
    """Copy prefopt/ and backends/ to .docs-build/api/prefopt{,/backends}."""
    shutil.rmtree(API_SOURCES, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "prefopt", API_SOURCES / "prefopt", ignore=ignore)
    shutil.copytree(ROOT / "backends", API_SOURCES / "prefopt" / "backends", ignore=ignore)


def mathjax_files() -> dict[str, Path]:
    """Site path -> file of the pinned MathJax release (the SVG build: no web fonts)."""
    try:
        dist = distribution("django-static-mathjax")
    except PackageNotFoundError:
        raise SystemExit(
            "docs: MathJax is served from the package django-static-mathjax; "
            'install the docs extra: pip install -c constraints.txt -e ".[docs]"'
        ) from None
    base = Path(dist.locate_file("mathjax/static/mathjax"))
    return {MATHJAX: base / "es5" / "tex-svg.js", "assets/mathjax/LICENSE": base / "LICENSE"}


def on_startup(command, dirty):  # noqa: D103
    stage_api_sources()


def on_pre_build(config):  # noqa: D103 (mkdocs serve rebuilds: pick up edited sources)
    stage_api_sources()


def on_files(files, config):  # noqa: D103
    for uri, path in mathjax_files().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
