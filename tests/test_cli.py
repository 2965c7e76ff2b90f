"""The ``prefopt`` command's own surface: --version, --help, and the examples it prints."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import prefopt
from prefopt.cli import main, parser

CLI_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "training" / "cli.md"


def train_parser():
    sub = next(a for a in parser()._actions if a.dest == "command")
    return sub.choices["train"]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"prefopt {prefopt.__version__}\n"


def test_help_imports_neither_torch_nor_transformers():
    # --help must come back at once: building the parser imports no training stack.
    code = (
        "import sys\nfrom prefopt.cli import parser\nparser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_option_is_documented_on_the_cli_page():
    page = CLI_PAGE.read_text()
    options = [s for a in train_parser()._actions for s in a.option_strings if s.startswith("--")]
    missing = [o for o in options if o != "--help" and f"`{o}" not in page]
    assert not missing, f"options missing from docs/training/cli.md: {missing}"
    assert "`prefopt --version`" in page


def commands():
    """Every `prefopt train ...` command in --help texts and on the CLI page's bash blocks."""
    texts = [train_parser().description] + [a.help or "" for a in train_parser()._actions]
    found = [m.rstrip(".") for t in texts for m in re.findall(r"prefopt train(?: [^ ]+)*", t)]
    blocks = re.findall(r"```bash\n(.*?)```", CLI_PAGE.read_text(), re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("prefopt train"):
                found.append(line)
    return found


def test_help_and_page_commands_parse_and_pass_the_option_checks(tmp_path):
    pytest.importorskip("torch")
    from prefopt.cli.config import Config
    from prefopt.cli.train import check

    cmds = commands()
    assert len(cmds) >= 4, cmds
    for cmd in cmds:
        args = train_parser().parse_args(shlex.split(cmd)[2:])
        given = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
        check(Config(**given, extra=dict(args.option)))
    # the --option examples of the help text, each with the loss it names
    for loss, option in (("mpo", {"weighting": "signed"}), ("dpo", {"label_smoothing": 0.1})):
        check(Config(loss=loss, extra=option))
