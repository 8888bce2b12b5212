"""The wide zoo's model list: the smallest variant of every timm architecture family that builds offline.

    python -m bench.zoo_families [--out bench/results/zoo-wide-models.json] [--modules a,b]

A *family* is the ``timm.models.<module>`` its entrypoints are registered from (``timm.list_modules()``,
``timm.list_models(module=...)``): one module, one architecture family. Its variants are ranked by their
parameter count (10 classes), counted cheaply: every parameter is moved to the ``meta`` device as soon
as it is registered, so neither its storage nor its initialisation costs anything (a variant whose
constructor reads its own parameters' values is built with every tensor on the meta device instead; one
that cannot be counted either way ranks last, its reason kept).
Then, smallest first, each variant is built for real (random init) and run on one 3x64x64 input; if that
fails it is tried with ``img_size=64`` where ``create_model`` accepts that keyword, then with ``img_size`` at a
few sizes above 64 (:data:`LARGER`), then at the size of its pretrained config (``input_size``). The first
variant that runs is the family's entry; a family with none is kept in the list with each try's first error line, never dropped.

The list is committed (bench/results/zoo-wide-models.json) so that the wide zoo's selection is
reproducible; this module remakes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchslim.engine.errors import first_line

LIST = Path(__file__).resolve().parent / "results" / "zoo-wide-models.json"
SIZE = 64
TRIES = 3  # variants built for real per family before it is reported as not building


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is replaced by a meta tensor of its shape (no storage, no init)."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def count_parameters(timm: Any, name: str) -> int:
    """``name``'s parameter count with 10 classes, built with its parameters on the meta device; if its
    constructor reads a parameter's values, built with every tensor on the meta device instead."""
    import torch

    try:
        with _parameters_on_meta():
            model = timm.create_model(name, pretrained=False, num_classes=10)
    except Exception:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=10)
    return sum(p.numel() for p in model.parameters())


def ranked(timm: Any, module: str) -> list[dict[str, Any]]:
    """The variants of ``module``, smallest parameter count first (uncountable ones last, with the reason)."""
    rows = []
    for name in timm.list_models(module=module):
        try:
            rows.append({"model": name, "params": count_parameters(timm, name)})
        except Exception as exc:
            rows.append({"model": name, "params": None, "count_error": first_line(exc, typed=True, limit=120)})
    return sorted(rows, key=lambda r: (r["params"] is None, r["params"] or 0, r["model"]))


#: Sizes above :data:`SIZE` tried with ``img_size`` before the native size: a model whose patch size does not
#: divide 64 (14: DINOv2-style ViTs) runs at the first multiple of it, not at its pretrained size (546 x 546 for
#: deepseek_vit_412m: 778 GMACs an image, far past the zoo's time limit before the stage starts).
LARGER = (70, 72, 80, 96, 112)


def _attempts(timm: Any, name: str) -> Iterator[tuple[dict[str, Any], int]]:
    """(create_model kwargs, input size) to try, in order: 64x64, ``img_size=64``, ``img_size`` at each of
    :data:`LARGER` (where the native size is larger), the native size."""
    yield {}, SIZE
    yield {"img_size": SIZE}, SIZE
    native = int((timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224))[-1])
    for size in (s for s in LARGER if s < native):
        yield {"img_size": size}, size
    if native != SIZE:
        yield {}, native


def probe(timm: Any, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The first (kwargs, size) at which ``name`` builds and runs one input, and every failed try's error."""
    import torch

    errors = []
    for kwargs, size in _attempts(timm, name):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            with torch.no_grad():
                out = model(torch.randn(1, 3, size, size))
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 10):
                raise ValueError(f"output is {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, not (1, 10) logits")
        except Exception as exc:
            errors.append(f"{kwargs or 'plain'} at {size}: {first_line(exc, typed=True, limit=140)}")
            continue
        return {"kwargs": kwargs, "size": size}, errors
    return None, errors


def select(timm: Any, module: str) -> dict[str, Any]:
    """The family entry of ``module``: its smallest variant that runs, or why none did."""
    start = time.time()
    variants = ranked(timm, module)
    entry: dict[str, Any] = {"family": module, "variants": len(variants)}
    tried = []
    for row in variants[:TRIES]:
        found, errors = probe(timm, row["model"])
        tried.append({"model": row["model"], "errors": errors})
        if found:
            entry.update(model=row["model"], params=row["params"], **found)
            break
    else:
        entry.update(
            model=None,
            reason="no variant built and ran: "
            + "; ".join(f"{t['model']}: {t['errors'][-1] if t['errors'] else 'not counted'}" for t in tried)
            if tried
            else "no variant",
        )
    if tried and (entry.get("model") is None or tried[0]["model"] != entry["model"] or tried[0]["errors"]):
        entry["tries"] = tried
    entry["seconds"] = round(time.time() - start, 1)
    return entry


def load(path: Path = LIST) -> list[dict[str, Any]]:
    """The committed family list (one entry per timm module)."""
    return list(json.loads(path.read_text())["families"])


def main(argv: list[str] | None = None) -> int:
    from bench.zoo import _timm

    parser = argparse.ArgumentParser(prog="python -m bench.zoo_families", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(LIST))
    parser.add_argument(
        "--modules", help="comma-separated timm modules to (re)select, keeping the others of --out (default: all, a new list)"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    timm = _timm()
    modules = args.modules.split(",") if args.modules else timm.list_modules()
    # --modules redoes those families in an existing list and keeps the others
    families = {f["family"]: f for f in load(Path(args.out))} if args.modules and Path(args.out).exists() else {}
    order = {module: i for i, module in enumerate(timm.list_modules())}
    for module in modules:
        entry = families[module] = select(timm, module)
        print(f"{module}: {entry.get('model') or 'NONE ' + entry['reason'][:120]} ({entry['seconds']} s)", flush=True)
        listed = sorted(families.values(), key=lambda f: order.get(f["family"], len(order)))
        Path(args.out).write_text(
            json.dumps(
                {
                    "timm": timm.__version__,
                    "torch": torch.__version__,
                    "size": SIZE,
                    "made_by": "python -m bench.zoo_families",
                    "families": listed,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
