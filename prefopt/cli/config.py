"""The settings of a ``prefopt train`` run.

Importable without torch: ``prefopt --help`` builds its parser from these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Config"]

# The defaults that depend on the model: (the tiny built-in model, a pretrained model).
# A rate that trains the 0.1 M random model (3e-3) wrecks a pretrained one in one step; the
# pretrained values are those measured on SmolLM2-135M-Instruct (docs: the prefopt train page).
BY_MODEL = {
    "lr": (3e-3, 1e-5),
    "temperature": (1.0, 0.7),
    "max_new_tokens": (6, 10),
    "steps": (600, 30),
    "prompts_per_step": (8, 4),
    "eval_every": (50, 10),
}


@dataclass
class Config:
    """The settings of a ``prefopt train`` run: one field per command-line option.

    Each field is the option of the same name with ``-`` written ``_`` (``--prompts-per-step``
    is ``prompts_per_step``), with the same default; the options table of the prefopt train page
    gives their meanings. The fields of ``BY_MODEL`` default to ``None``: the tiny model's
    value or a pretrained model's, filled in by ``resolved``. Two fields have no option of
    that name: ``extra`` holds the
    ``--option KEY=VALUE`` pairs as a dict, and ``progress`` is ``False`` for
    ``--no-progress``.

    Examples:
        >>> from prefopt.cli.config import Config
        >>> Config(loss="dpo", extra={"label_smoothing": 0.1}).responses
        8
        >>> Config().resolved(pretrained=True).lr
        1e-05
    """

    model: str | None = None  # None: the tiny built-in model
    dtype: str = "auto"
    data: str | None = None
    loss: str = "mpo"
    responses: int = 8
    beta: float | None = None  # None: the loss's own default
    alpha: float | None = None
    steps: int | None = None
    seed: int = 0
    output: str = "prefopt-run"
    resume: bool = False
    lr: float | None = None
    prompts_per_step: int | None = None
    prompts: str | None = None  # a JSONL file of prompts (on-policy)
    eval_prompts: str | None = None
    reward: str | None = None  # MODULE:FUNCTION or FILE.py:FUNCTION
    reward_model: str | None = None  # a sequence-classification checkpoint directory
    temperature: float | None = None
    top_p: float = 1.0
    max_new_tokens: int | None = None
    eval_every: int | None = None
    save_every: int = 100
    pairs: str = "all"
    no_reference: bool = False
    max_length: int = 512
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved(self, pretrained: bool) -> Config:
        """A copy with each ``None`` of ``BY_MODEL`` set for the tiny or a pretrained model."""
        from dataclasses import replace

        unset = {k: v[pretrained] for k, v in BY_MODEL.items() if getattr(self, k) is None}
        return replace(self, **unset)
