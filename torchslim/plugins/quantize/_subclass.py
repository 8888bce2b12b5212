"""The user's subclasses of quantizable layers (``class Head(nn.Linear)``), quantized as their base class.

torch's quantization maps layers by their exact type: dynamic quantization skips a subclass of
Linear, FX traces through its forward and quantizes a functional linear whose packed weights a
``weights_only`` state dict cannot hold, and the quantized layers' ``from_float`` refuse it. So a
subclass whose forward computes what its base class computes (checked on the example inputs) and
that holds nothing but ``weight`` and ``bias`` becomes an instance of its base class before any
backend sees it; any other subclass stays float and opaque to tracing, and a note says why.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._layers import layer_type, select_layers
from ._backends import BackendError

#: What a subclass that never ran on the example inputs is told (its forward could not be compared).
NOT_RUN = "it did not run on the example inputs"


@dataclass
class BaseLayers:
    """The model with its plain subclass layers turned into their base class, and what happened to each."""

    model: nn.Module
    """A copy with the swapped layers (the input model itself when there was nothing to swap)."""
    swapped: dict[str, str] = field(default_factory=dict)
    """``{layer name: subclass name}`` of the layers now of their base class."""
    kept: dict[str, str] = field(default_factory=dict)
    """``{layer name: why}`` of the subclass layers left float."""

    def notes(self) -> list[str]:
        """What the summary says about the subclasses (nothing when the model has none)."""
        notes = []
        if self.swapped:
            named = ", ".join(f"{name} ({kind})" for name, kind in self.swapped.items())
            notes.append(f"subclass layers quantized as their base class: {named}")
        if self.kept:
            named = "; ".join(f"{name}: {why}" for name, why in self.kept.items())
            notes.append(f"subclass layers left float: {named}")
        return notes


def as_base_layers(model: nn.Module, types: Sequence[str], exclude: Sequence[str], example: Any) -> BaseLayers:
    """Turn the subclasses of ``types`` in ``model`` (outside ``exclude``) into their base class where
    that changes nothing on ``example``; the input model is left as it was."""
    wanted = tuple(layer_type(t) for t in types)
    subclasses = {name: m for name, m in select_layers(model, types, exclude) if type(m) not in wanted}
    if not subclasses:
        return BaseLayers(model)
    differences = _forward_differences(model, subclasses, example)
    result = BaseLayers(copy.deepcopy(model))
    for name, module in subclasses.items():
        why = _extra_state(module) or differences[name]
        if why:
            result.kept[name] = f"{type(module).__name__} ({why})"
        else:
            result.swapped[name] = type(module).__name__
    swap_to_base(result.model, list(result.swapped))
    return result


def swap_to_base(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Make the layers called ``names`` instances of their torch.nn base class, in place (restore's half)."""
    for name in names:
        module = model.get_submodule(name)
        # A new class, same instance: every attribute the base class's forward and torch's
        # from_float read (in_features, padding_mode, ...) is already there, set by its __init__.
        module.__class__ = base_class(type(module))
    return model


def base_class(kind: type[nn.Module]) -> type[nn.Module]:
    """The first torch.nn layer class among ``kind``'s ancestors (``Head(nn.Linear)`` -> ``nn.Linear``)."""
    return next(c for c in kind.__mro__ if c.__module__.startswith("torch.nn.modules."))


def _extra_state(module: nn.Module) -> str | None:
    """Why swapping ``module`` would drop some of its state, or None."""
    extra = sorted(set(module.state_dict()) - {"weight", "bias"})
    if extra:
        return f"it holds more than weight and bias: {', '.join(extra[:4])}"
    return None


def _forward_differences(model: nn.Module, layers: dict[str, nn.Module], example: Any) -> dict[str, str | None]:
    """``{name: why the layer is not its base class on example}`` (None where it computes the same)."""
    reasons: dict[str, str | None] = dict.fromkeys(layers, NOT_RUN)

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if reasons[name] in (None, NOT_RUN):  # every call must agree; the first difference stays
                reasons[name] = _differs(module, args, kwargs, output)

        return hook

    handles = [m.register_forward_hook(hook_for(name), with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as exc:  # the user's forward can fail in any way
        raise BackendError(f"the model's forward failed on the example inputs ({type(exc).__name__}: {exc})") from exc
    finally:
        for handle in handles:
            handle.remove()
    return reasons


def _differs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> str | None:
    base = base_class(type(module))
    try:
        expected = base.forward(module, *args, **kwargs)
    except Exception as exc:  # the subclass takes inputs its base class cannot
        return f"{base.__name__}'s forward cannot run its inputs: {type(exc).__name__}"
    same = (
        isinstance(output, torch.Tensor)
        and isinstance(expected, torch.Tensor)
        and output.shape == expected.shape
        and torch.allclose(output, expected, rtol=1e-5, atol=1e-6)
    )
    return None if same else f"its forward computes something other than {base.__name__}'s"
