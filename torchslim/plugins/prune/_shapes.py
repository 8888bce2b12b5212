"""Recording and replaying a model's shape changes as plain data, for saving and loading pruned models.

A structured prune changes tensor shapes and the size attributes of layers (``out_channels``,
``in_features``, ``groups``, ``num_features``...). Loading a saved model needs only those: the
architecture is rebuilt, resized to the recorded shapes, and the saved tensors fill it. The
record is independent of how the channels were chosen, so loading neither traces the model nor
imports torch-pruning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

Plain = int | float | bool | str | None


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Shapes of every parameter and buffer, and the plain size attributes of every module."""
    return {
        "tensors": {name: list(t.shape) for name, t in _tensors(model)},
        # every name a module is registered under (a layer shared by two attributes is listed under both)
        "attributes": {name: _attributes(module) for name, module in model.named_modules(remove_duplicate=False)},
    }


def changes(before: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """What differs between ``before`` (a :func:`snapshot`) and ``model`` now, as plain data."""
    after = snapshot(model)
    tensors = {name: shape for name, shape in after["tensors"].items() if before["tensors"].get(name) != shape}
    attributes: dict[str, dict[str, Any]] = {}
    for name, values in after["attributes"].items():
        old = before["attributes"].get(name, {})
        changed = {key: value for key, value in values.items() if old.get(key) != value}
        if changed:
            attributes[name] = changed
    return {"tensors": tensors, "attributes": attributes}


def replay(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Resize ``model`` to a :func:`changes` record: the values are placeholders until a state dict is loaded.

    A layer registered under several names (``self.a = self.b = nn.Linear(...)``) is found under each of them,
    and a tensor shared by several layers (tied weights) stays one tensor, shared as it was."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, values in record.get("attributes", {}).items():
        module = _module(modules, name)
        for key, value in values.items():
            current = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
    fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, shape in record.get("tensors", {}).items():
        _resize(modules, name, [int(s) for s in shape], fresh)
    return model


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def _attributes(module: nn.Module) -> dict[str, Any]:
    # Public plain attributes only: sizes such as in_channels, out_features, groups, num_features
    # (not the train/eval flag, which a stage may leave either way).
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in vars(module).items()
        if not key.startswith("_") and key != "training" and _is_plain(value)
    }


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, (int, float, bool, str)) for v in value)
    return isinstance(value, (int, float, bool, str)) or value is None


def _module(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise KeyError(f"the saved structure names a layer '{name}' that the rebuilt model does not have")
    return modules[name]


def _resize(
    modules: Mapping[str, nn.Module], name: str, shape: list[int], fresh: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Give tensor ``name`` a placeholder of ``shape``; ``fresh`` maps each tensor replaced so far (kept alive,
    so that its id is not reused) to its placeholder, which every other name of that tensor gets too."""
    owner_name, _, attr = name.rpartition(".")
    owner = _module(modules, owner_name)
    old = getattr(owner, attr)
    if any(new is old for _, new in fresh.values()):
        return  # already replaced under another name of its shared layer
    _, new = fresh.get(id(old), (old, None))
    if new is None:
        empty = torch.zeros(shape, dtype=old.dtype, device=old.device)
        new = nn.Parameter(empty, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else empty
        fresh[id(old)] = (old, new)
    if isinstance(new, nn.Parameter):
        setattr(owner, attr, new)
    else:
        owner._buffers[attr] = new
