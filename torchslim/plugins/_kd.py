"""Knowledge-distillation pieces: the losses, forward hooks on named layers, and width projections."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

FeatureLoss = Literal["mse", "cosine"]


def hinton_loss(
    student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``.

    The hard term uses the true labels, not the teacher's argmax. With ``alpha == 0`` the
    teacher is not needed (``None``): plain fine-tuning on the labels.
    """
    hard = F.cross_entropy(student, labels)
    if alpha == 0 or teacher is None:
        return hard
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean")
    return alpha * t * t * soft + (1 - alpha) * hard


def feature_loss(kind: FeatureLoss, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance between a (projected) student feature map and the teacher's, averaged over the batch."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    similarity = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)
    return (1 - similarity).mean()


class Taps:
    """Forward hooks that keep the outputs of named layers of one model, in a fixed order.

    ``owner`` (``student`` or ``teacher``) names the model in messages: ``features[i].<owner>``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], owner: str) -> None:
        layers = dict(model.named_modules())
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        self.handles: list[RemovableHandle] = []
        for index, name in enumerate(names):
            if name not in layers:
                self.remove()
                raise LookupError(f"features[{index}].{owner}: {_unknown_layer(name, owner, list(layers))}")
            self.handles.append(layers[name].register_forward_hook(self._keeper(index, name, owner)))

    def _keeper(self, index: int, name: str, owner: str) -> Any:
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"features[{index}].{owner}: layer '{name}' returns {type(output).__name__}, not a tensor: pick another layer"
                )
            self.outputs[index] = output

        return keep

    def take(self) -> list[torch.Tensor]:
        """The outputs of the last forward pass, then forget them (they hold the autograd graph)."""
        if any(o is None for o in self.outputs):
            raise RuntimeError("a hooked layer did not run in the forward pass")
        taken = [o for o in self.outputs if o is not None]
        self.outputs = [None] * len(self.outputs)
        return taken

    def remove(self) -> None:
        """Detach the hooks: the models are left as they were."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _unknown_layer(name: str, owner: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(known[1:13]) + (", ..." if len(known) > 13 else "")
    return f"no layer '{name}' in the {owner}{hint} (layers: {listed})"


def projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """A learned map from the student's feature shape to the teacher's (identity when they agree).

    Linear over features for ``N x C`` and ``N x L x C``; 1x1 convolution over channels for
    ``N x C x L`` and ``N x C x H x W``. Other differences (spatial sizes) cannot be projected.
    """
    s, t = tuple(student.shape[1:]), tuple(teacher.shape[1:])
    if s == t:
        return nn.Identity()
    if len(s) == len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == len(t) == 2 and s[0] == t[0]:
        return nn.Linear(s[1], t[1])
    if len(s) == len(t) and len(s) in (2, 3) and s[1:] == t[1:]:
        conv = nn.Conv1d if len(s) == 2 else nn.Conv2d
        return conv(s[0], t[0], kernel_size=1)
    raise ValueError(
        f"student output {_shape(student)} cannot be projected onto teacher output {_shape(teacher)}: "
        "only the channel (feature) width may differ; pick layers with the same spatial size"
    )


def _shape(tensor: torch.Tensor) -> str:
    return "N x " + " x ".join(str(d) for d in tensor.shape[1:])


class Trainee(nn.Module):
    """The student plus its feature projections: what the optimizer trains (and DDP wraps).

    ``forward`` returns the student's logits and its hooked features, projected to the
    teacher's widths. Only ``student`` is returned to the engine; the projections are dropped.
    """

    def __init__(self, student: nn.Module, taps: Taps | None, projections: Sequence[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(projections)
        self._taps = taps

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and projected features for one batch."""
        logits = self.student(inputs)
        if self._taps is None:
            return logits, []
        return logits, [p(f) for p, f in zip(self.projections, self._taps.take(), strict=True)]


def probe_projections(
    student: nn.Module, teacher: nn.Module, student_taps: Taps, teacher_taps: Taps, inputs: torch.Tensor
) -> list[nn.Module]:
    """One projection per hooked pair, sized from a forward pass of both models in eval mode.

    Eval mode, so the probe does not move BatchNorm statistics. ValueError naming the pair index
    if a pair's shapes cannot be projected.
    """
    modes = [(model, model.training) for model in (student, teacher)]
    with torch.no_grad():
        for model, _ in modes:
            model.eval()(inputs)
    for model, training in modes:
        model.train(training)
    projections = []
    for index, (s, t) in enumerate(zip(student_taps.take(), teacher_taps.take(), strict=True)):
        try:
            projections.append(projection(s, t))
        except ValueError as exc:
            raise ValueError(f"features[{index}]: {exc}") from None
    return projections
