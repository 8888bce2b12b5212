"""The closing measurements of a run: the headline speed-up, the load after, the notes they need.

The latency column times each model once, stage by stage, minutes apart; the machine's load can
change in between. The speed-up a run is judged by is therefore timed again at the end, the
baseline and the final model taking turns round by round (:func:`~torchslim.engine.timing.speedup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .metrics import latency_batch
from .noise import speedup_noise
from .reference import reference_line, time_against
from .report import Report
from .timing import load_average, speedup

if TYPE_CHECKING:
    from .recipe import MetricsOptions
    from .stage import Context


def close_report(report: Report, ctx: Context, final: nn.Module, options: MetricsOptions, reference: Path | None = None) -> None:
    """Time baseline and final model interleaved (when latency is measured and a stage changed the
    model), and the final model in turns with the ``reference`` saved model if one is given (latency measured);
    record the load average now, and add the speed-up line and the noise notes."""
    timing = options.collect and options.latency
    batch = latency_batch(ctx.example_inputs, options.batch_size)
    if timing and reference is not None:
        report.reference = time_against(reference, final, batch, options)
        report.add_notes([reference_line(report.reference)])
    if timing and any(not row.unchanged for row in report.rows[1:]):
        result = speedup(
            ctx.original.eval(), final.eval(), batch, warmup=options.warmup, runs=options.runs, threads=options.threads
        )
        report.speedup = result.to_dict()
    report.environment["load_after"] = load_average()
    if report.speedup is not None:
        report.speedup["noisy"] = speedup_noise(report.speedup, report.environment)
    report.notes[:0] = [note for note in report.measurement_notes() if note not in report.notes]


def compiled_note(label: str, model: nn.Module) -> str | None:
    """The caveat of a stage whose model runs through torch.compile while the baseline runs eagerly."""
    from torch._dynamo.eval_frame import OptimizedModule

    if not any(isinstance(m, OptimizedModule) for m in model.modules()):
        return None
    return (
        f"{label}: its latency (and the speed-up) is that of a torch.compile'd model against the eager, "
        f"uncompiled baseline: the ratio includes what compiling alone gains"
    )
