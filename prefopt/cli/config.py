"""The settings of a ``prefopt train`` run.

Importable without torch: ``prefopt --help`` builds its parser from these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Config"]


@dataclass
class Config:
    """The settings of a ``prefopt train`` run: one field per command-line option.

    Each field is the option of the same name with ``-`` written ``_`` (``--prompts-per-step``
    is ``prompts_per_step``), with the same default; the options table of the prefopt train page
    gives their meanings. Two fields have no option of that name: ``extra`` holds the
    ``--option KEY=VALUE`` pairs as a dict, and ``progress`` is ``False`` for
    ``--no-progress``.

    Examples:
        >>> from prefopt.cli.config import Config
        >>> Config(loss="dpo", extra={"label_smoothing": 0.1}).responses
        8
    """

    model: str | None = None
    data: str | None = None
    loss: str = "mpo"
    responses: int = 8
    beta: float | None = None  # None: the loss's own default
    alpha: float | None = None
    steps: int = 600
    seed: int = 0
    output: str = "prefopt-run"
    resume: bool = False
    lr: float = 3e-3
    prompts_per_step: int = 8
    prompts: str | None = None  # a JSONL file of prompts (on-policy)
    eval_prompts: str | None = None
    reward: str | None = None  # MODULE:FUNCTION or FILE.py:FUNCTION
    reward_model: str | None = None  # a sequence-classification checkpoint directory
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 6
    eval_every: int = 50
    save_every: int = 100
    pairs: str = "all"
    no_reference: bool = False
    max_length: int = 512
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)
