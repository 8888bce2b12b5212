"""The one exception hierarchy of torchslim.

Only the CLI turns these into messages and exit codes; library code raises them and
never prints. Every message starts with the thing at fault (file position, stage, option).
"""

from __future__ import annotations

import re

#: Terminal control sequences (colour, bold): torch's weights_only refusal bolds a phrase with them.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class TorchslimError(Exception):
    """Base class of every error torchslim raises on purpose."""

    exit_code = 1
    log_path: object = None
    """Where the runner wrote the traceback (a Path), when it had an output directory."""


class UserInputError(TorchslimError):
    """Bad input from the user: a recipe, a file, an argument. Exit code 2."""

    exit_code = 2


class UsageError(UserInputError):
    """A command-line argument that does not make sense."""


class RecipeError(UserInputError):
    """A recipe that cannot be read or does not validate.

    ``problems`` holds one line per problem, each already prefixed with
    ``file:line:col: field.path`` where a location is known.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(UserInputError):
    """A stage type that is unknown, or whose plugin failed to load."""


class CheckpointError(UserInputError):
    """A checkpoint or saved model that cannot be loaded safely."""


class OutputError(UserInputError):
    """An output directory that cannot be written without losing the user's files."""


class UserCodeError(RecipeError):
    """The recipe's own code (its model, data or metric target) failed, or does not fit the data. Exit code 2.

    The message names the recipe field (``path``, located by the caller when it knows the file),
    the callable and the exception; the user's traceback is kept as ``__cause__`` (``--debug``).
    """

    def __init__(self, problems: list[str] | str, path: tuple[object, ...] = ()) -> None:
        super().__init__(problems)
        self.path = path


class StageError(TorchslimError):
    """A stage that failed while running, or that would have changed nothing. Exit code 1."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        self.message = message
        self.position: str | None = None
        """Where the stage is in the recipe, ``stages[2] (quantize) at recipe.yaml:14:5``, once the runner located it."""
        super().__init__(f"stage {stage}: {message}")

    def locate(self, index: int, stage_type: str, where: str) -> None:
        """Add the stage's index, type and recipe position (the runner knows them; the stage does not).

        They follow the message, so that it still starts with the stage at fault: ``stage int8: ...
        (stages[2] (quantize) at recipe.yaml:14:5)``.
        """
        if self.position is None:
            self.position = f"stages[{index}] ({stage_type}) at {where}"
            self.args = (f"stage {self.stage}: {self.message} ({self.position})",)


def plain_text(text: str) -> str:
    """``text`` without terminal control sequences: a library's message may carry them, and in an error
    message, a log file or a report they show as raw escape codes."""
    return _ANSI.sub("", text)


def first_line(exc: BaseException, typed: bool = False, limit: int = 300) -> str:
    """The first line of an exception's message (after its type name with ``typed``), at most ``limit``
    characters, without terminal control sequences: what a one-line note or error shows of a library's failure."""
    text = plain_text(f"{type(exc).__name__}: {exc}" if typed else str(exc))
    lines = text.strip().splitlines()
    return (lines[0] if lines else (type(exc).__name__ if typed else ""))[:limit]
