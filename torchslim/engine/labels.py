"""Stage labels that tell the rows apart: ``prune``, ``prune-2``, ... for stages the recipe did not name.

A name the recipe gives is kept as it is; two stages given the same name are a recipe error
naming both positions (the rows, checkpoints' logs and error messages could not tell them apart).
A stage without a name is labelled by its type, numbered from the second of its type on
(``prune``, ``prune-2``, ``prune-3``), skipping any label a named stage already uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import RecipeError

if TYPE_CHECKING:
    from .recipe import RecipeBase
    from .stage import Stage


def check_names(recipe: RecipeBase) -> None:
    """RecipeError if two stages are given the same ``name``, naming both positions."""
    first: dict[str, int] = {}
    problems = []
    for index, stage in enumerate(recipe.stage_list):
        if stage.name is None:
            continue
        if stage.name in first:
            other = first[stage.name]
            problems.append(
                f"{recipe.where(('stages', index, 'name'))}: stages[{index}].name ({stage.type}): "
                f"'{stage.name}' is already the name of stages[{other}] "
                f"({recipe.where(('stages', other, 'name'))}); stage names label the rows and must differ"
            )
        else:
            first[stage.name] = index
    if problems:
        raise RecipeError(problems)


def unique_labels(stages: list[Stage]) -> list[str]:
    """One label per stage: its name if given, else its type numbered from the second of that type on."""
    taken = {stage.name for stage in stages if stage.name is not None}
    counts: dict[str, int] = {}
    labels = []
    for stage in stages:
        if stage.name is not None:
            labels.append(stage.name)
            continue
        label = stage.type
        while label in taken:
            counts[stage.type] = counts.get(stage.type, 1) + 1
            label = f"{stage.type}-{counts[stage.type]}"
        taken.add(label)
        labels.append(label)
    return labels


def labelled(stages: list[Stage]) -> list[Stage]:
    """The stages, each unnamed one given its unique label as ``name`` (copies; the recipe is left as it is)."""
    return [
        stage if stage.name == label else stage.model_copy(update={"name": label})
        for stage, label in zip(stages, unique_labels(stages), strict=True)
    ]
