"""A quantized layer keeps its torch identity: the ``.weight`` and ``.bias`` a model's own code reads.

Models read their layers' weights outside the layers' forward: ``x.to(self.fc.weight.device)``, a tied
head's ``F.linear(h, self.embed_proj.weight)``, and torch's own ``nn.TransformerEncoderLayer``, whose fused
fast path reads ``self.linear1.weight``. torch.ao's quantized Linear has ``weight()`` as a method, and a
wrapper has no ``weight`` at all, so such code fails once the layer is replaced.

Here the weight reads as an :class:`IdentityTensor`: the dequantized int8 values, with the float layer's
shape, dtype and device. It is a tensor subclass, so torch's fused paths, which refuse any argument with
``__torch_function__``, run the layer's module call instead of computing with the float weights behind the
int8 layer's back. Code that computes with the weight and never calls the layer would still bypass it:
:func:`bypassed_layers` finds such layers (never called, their weights used), and the stages leave them
float with a note.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

#: What reading these attributes or calling these methods of an :class:`IdentityTensor` asks of it: its
#: shape, dtype and device only, answered without dequantizing the weight.
_METADATA = frozenset(
    {
        "shape",
        "device",
        "dtype",
        "requires_grad",
        "is_quantized",
        "ndim",
        "layout",
        "is_cuda",
        "is_cpu",
        "is_meta",
        "is_sparse",
        "is_nested",
        "grad",
        "grad_fn",
        "is_leaf",
        "names",
        "size",
        "dim",
        "numel",
        "is_floating_point",
        "get_device",
    }
)


class IdentityTensor(torch.Tensor):
    """A quantized layer's weight (or bias) as float values, dequantized only when they are used.

    It has the float tensor's shape, dtype and device, which reading costs nothing (torch's fast-path
    checks read them at every call); any other operation dequantizes the weight and runs on that plain
    tensor, returning plain tensors. Its ``__torch_function__`` makes torch's fused paths use the layer.
    """

    _values: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(cls, shape: Sequence[int], values: Callable[[], torch.Tensor]) -> IdentityTensor:
        # float32 on the CPU: what torch.ao's quantized layers (CPU kernels) dequantize to.
        tensor: IdentityTensor = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=torch.float32)
        tensor._values = values
        return tensor

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Metadata from the wrapper itself; anything else on the dequantized values, as plain tensors."""
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None) if getattr(func, "__name__", "") == "__get__" else func
        if getattr(owner, "__name__", None) not in _METADATA:
            args, kwargs = _plain(args), _plain(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        """An operation that reached the dispatcher (torch's C++ code, below ``__torch_function__``): on the values."""
        return func(*_plain(args), **_plain(kwargs or {}))

    def __repr__(self) -> str:  # type: ignore[override]
        """The values'."""
        return repr(self._values())


def _plain(value: Any) -> Any:
    if isinstance(value, IdentityTensor):
        return value._values()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class CallableIdentityTensor(IdentityTensor):
    """An :class:`IdentityTensor` that also answers torch.ao's ``weight()`` / ``bias()`` method calls."""

    _call: Callable[[], torch.Tensor | None]

    def __call__(self) -> torch.Tensor | None:
        """What the quantized layer's method returned: the int8 weight (a quantized tensor) or the float bias."""
        return self._call()


def identity_tensor(
    shape: Sequence[int], get: Callable[[], torch.Tensor | None], owner: object, answers_calls: bool = False
) -> IdentityTensor:
    """An :class:`IdentityTensor` of ``shape`` whose values are ``get()``, dequantized; with ``answers_calls``,
    calling it returns ``get()`` itself (the quantized layer's own method result). Using its values counts as
    a use of ``owner``'s weights (:func:`bypassed_layers`)."""
    key = id(owner)

    def values() -> torch.Tensor:
        for used in _RECORDING:
            used.add(key)
        value = get()
        if value is None:
            raise ValueError("the quantized layer no longer has this tensor")
        return (value.dequantize() if value.is_quantized else value).detach()

    if not answers_calls:
        return IdentityTensor(shape, values)
    tensor = CallableIdentityTensor(shape, values)
    tensor._call = get
    return tensor


#: While :func:`bypassed_layers` runs the model: the ids of the layers whose identity tensors' values were used.
_RECORDING: list[set[int]] = []


class ReadableWeights:
    """A mixin for torch.ao's quantized layers (dynamic and static Linear, Conv): ``weight`` and ``bias`` read
    as tensors (the float layer's identity) and are still callable as torch.ao's ``weight()`` and ``bias()``."""

    _weight_bias: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    _packed_params: Any

    @property
    def weight(self) -> Any:
        """The int8 weight dequantized (when used); ``weight()`` is torch.ao's int8 tensor."""
        return self._identity()[0]

    @property
    def bias(self) -> Any:
        """The float bias, or None; ``bias()`` returns it too."""
        return self._identity()[1]

    def _identity(self) -> tuple[IdentityTensor, IdentityTensor | None]:
        # torch's fast paths read both at every call; made once per packed weight (a new one after a load).
        packed = getattr(self._packed_params, "_packed_params", self._packed_params)  # Linear's is one level down
        known = _IDENTITIES.get(self)
        if known is None or known[0] is not packed:
            weight, bias = self._weight_bias()  # unpacking costs as much as a small forward: not at every read
            layer = weakref.ref(self)  # the cache's values must not keep its key alive

            def unpacked(index: int) -> Callable[[], torch.Tensor | None]:
                return lambda: layer()._weight_bias()[index]  # type: ignore[union-attr]

            known = (
                packed,
                identity_tensor(weight.shape, unpacked(0), self, True),
                None if bias is None else identity_tensor(bias.shape, unpacked(1), self, True),
            )
            _IDENTITIES[self] = known
        return known[1], known[2]


def readable(model: nn.Module, is_quantized: Callable[[nn.Module], bool]) -> nn.Module:
    """``model`` (changed in place) with each quantized layer (``is_quantized``) that keeps packed weights behind
    a ``weight()`` method (torch.ao's Linear and Conv) turned into a subclass of its class with :class:`ReadableWeights`."""
    for module in model.modules():
        kind = type(module)
        packs = all(callable(getattr(kind, name, None)) for name in ("weight", "_weight_bias"))  # not recurrent layers
        if is_quantized(module) and packs and not issubclass(kind, ReadableWeights):
            module.__class__ = readable_class(kind)
    return model


def readable_class(kind: type[nn.Module]) -> type[nn.Module]:
    """``kind`` with :class:`ReadableWeights` (one class per ``kind``, so that copies share it)."""
    if kind not in _READABLE:
        _READABLE[kind] = type(
            f"Readable{kind.__name__}",
            (ReadableWeights, kind),
            {"__module__": __name__, "__doc__": f"{kind.__name__} whose weight and bias read as tensors."},
        )
    return _READABLE[kind]


_READABLE: dict[type[nn.Module], type[nn.Module]] = {}


#: Each readable layer's identity tensors, with the packed weight they stand for. Kept outside the layers, so
#: that copying a layer (``copy.deepcopy``) copies no tensor subclass and no packed object twice.
_IDENTITIES: weakref.WeakKeyDictionary[Any, tuple[Any, IdentityTensor, IdentityTensor | None]] = weakref.WeakKeyDictionary()


def bypassed_layers(model: nn.Module, names: Iterable[str], run: Callable[[nn.Module], Any]) -> list[str]:
    """The layers among ``names`` that ``run(model)`` bypassed: their forward never ran, yet the values of their
    weight or bias were used (the model computes with them itself). A layer neither called nor read (a branch
    the example inputs did not take, an unused head) is not one of them."""
    names = list(names)
    called: set[str] = set()
    used: set[int] = set()

    def hook_for(name: str) -> Any:
        return lambda module, args, output: called.add(name)

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    _RECORDING.append(used)
    try:
        with torch.no_grad():
            run(model)
    finally:
        _RECORDING.remove(used)
        for handle in handles:
            handle.remove()
    return [name for name in names if name not in called and id(model.get_submodule(name)) in used]


def bypassed_note(names: Iterable[str]) -> str:
    """The note of the layers :func:`bypassed_layers` found, left float."""
    return (
        f"left float, as the model computes with their weights itself and never calls them on the example "
        f"inputs (int8, they would not run): {', '.join(names)}"
    )
