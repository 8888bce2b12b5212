"""The quickstart recipe written out by hand in plain torch: the engine-overhead baseline.

Prune 70% (global L1, made permanent), distil back toward the unpruned model (Hinton loss,
Adam, a constant or cosine learning rate, pruned weights kept at zero, the last epoch's weights
or the best epoch's by the eval accuracy), quantize
the Linear layers to dynamic int8, and score the model after each step, as the recipe's
report does. It seeds torch as ``torchslim.run`` does (the recipe seed before the model and
before the data; ``seed + i + 1`` before step ``i``), so both end with the same model.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, DistributedSampler

from torchslim.examples import digits


@dataclass(frozen=True)
class Plan:
    """The numbers of the quickstart recipe."""

    seed: int = 0
    hidden: int = 256
    train_epochs: int = 15
    batch_size: int = 64
    amount: float = 0.7
    epochs: int = 3
    temperature: float = 4.0
    alpha: float = 0.5
    lr: float | None = 1e-3
    """None: the distill stage's default, 0.01 for a student under a million trainable parameters, else 3e-4."""
    schedule: str = "constant"
    """``constant`` or ``cosine`` (decay to zero over the planned steps)."""
    keep: str = "last"
    """``last`` or ``best`` (the epoch with the best eval accuracy)."""


def accuracy(model: nn.Module, loader: DataLoader[Any]) -> float:
    """Percent of eval samples whose argmax is the label."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for inputs, labels in loader:
            correct += int((model(inputs).argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    return 100.0 * correct / total


def run(plan: Plan) -> tuple[nn.Module, list[float]]:
    """The whole recipe; returns the final model and the accuracy before and after each step."""
    torch.manual_seed(plan.seed)
    model = digits.mlp(hidden=plan.hidden, train_epochs=plan.train_epochs)
    torch.manual_seed(plan.seed)
    data = digits.loaders(batch_size=plan.batch_size)
    teacher = copy.deepcopy(model).eval()
    scores = [accuracy(model, data["eval"])]

    torch.manual_seed(plan.seed + 1)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=plan.amount)
    for module, name in layers:
        prune.remove(module, name)
    scores.append(accuracy(model, data["eval"]))

    torch.manual_seed(plan.seed + 2)
    distil(model, teacher, data, plan)
    scores.append(accuracy(model, data["eval"]))

    torch.manual_seed(plan.seed + 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation warnings
        # One weight scale per output channel, as torchslim's dynamic int8 does by default.
        per_channel = torch.ao.quantization.per_channel_dynamic_qconfig
        model = torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear: per_channel}, dtype=torch.qint8)
    if torch.cpu._is_vnni_supported():
        full_range_activations(model)  # as torchslim does on a VNNI CPU
    scores.append(accuracy(model, data["eval"]))
    return model, scores


def full_range_activations(model: nn.Module) -> None:
    """Each dynamic int8 Linear quantizes its inputs to 8 bits, not the 7 torch's module asks for."""

    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.quantized.linear_dynamic(x, module._packed_params._packed_params, reduce_range=False)
        return out.to(x.dtype)

    for module in model.modules():
        if type(module) is torch.ao.nn.quantized.dynamic.Linear:
            module.forward = forward.__get__(module)  # type: ignore[method-assign]


def distil(model: nn.Module, teacher: nn.Module, data: dict[str, DataLoader[Any]], plan: Plan) -> None:
    """Hinton distillation toward ``teacher``; zero weights stay zero; keeps the best epoch."""
    sampler_seed = int(torch.randint(2**31 - 1, (1,)))
    dataset = data["train"].dataset
    sampler: DistributedSampler[Any] = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=sampler_seed)
    loader = DataLoader(dataset, batch_size=plan.batch_size, sampler=sampler)
    masks = {name: p.detach() != 0 for name, p in model.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    lr = plan.lr if plan.lr is not None else (3e-4 if trainable >= 1_000_000 else 0.01)
    optimizer = torch.optim.Adam(params, lr=lr)
    total = len(loader) * plan.epochs

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine) if plan.schedule == "cosine" else None
    best, best_state = -math.inf, None
    for epoch in range(1, plan.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        for inputs, labels in loader:
            logits = model(inputs)
            with torch.no_grad():
                target = teacher(inputs)
            loss = hinton(logits, target, labels, plan.temperature, plan.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in masks:
                        p.mul_(masks[name])
        if plan.keep == "last":
            continue
        score = accuracy(model, data["eval"])
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()


def hinton(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``."""
    hard = F.cross_entropy(student, labels)
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean")
    return alpha * t * t * soft + (1 - alpha) * hard
