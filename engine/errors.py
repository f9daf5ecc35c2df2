"""User errors: a problem of the recipe, the environment or the inputs that the user fixes - not a bug.

Entry points print one line for them, ``error: <message>``, on rank 0 only, without a traceback, and exit with
code 2 (``engine/train.py``); a bug (any other exception) keeps its traceback. The message names the key or
the file and says what to do next: the toy recipe for a CPU machine, the extra to install, the prepare command,
the ``--set`` that changes it.

- :class:`engine.schema.ConfigError`: a recipe key is unknown, mistyped or inconsistent;
- :class:`MissingInput`: a data root, a weights file or another input named by the recipe is not there;
- :class:`MissingCapability`: the machine lacks what the recipe asks for (a CUDA device, an installed backend).
"""
from __future__ import annotations


class UserError(Exception):
    """A recipe, environment or input error; its message names the key or file and what to do next."""


class MissingInput(UserError, FileNotFoundError):
    """An input the recipe names (data root, weights, checkpoint) does not exist."""


class MissingCapability(UserError, RuntimeError):
    """The machine lacks what the recipe asks for (a CUDA device, an optional backend)."""


__all__ = ["MissingCapability", "MissingInput", "UserError"]
