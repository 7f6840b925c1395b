"""Printing benchmark figures beside their baselines and targets."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

__all__ = ["Figure", "percentile", "print_figures"]


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples`` by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Figure:
    """One measured figure, with its baseline from the same run and the target it aims for."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: float | None = None
    higher_is_better: bool = False

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    # Two decimals below 10: a figure beside its target must not round onto it (1.52 ms
    # printed as "1.5 ms", next to "≤ 1.5 ms: NO").
    if value < 10:
        return f"{value:.2f} {unit}"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def print_figures(
    title: str, figures: list[Figure], console: Console | None = None, caption: str | None = None
) -> None:
    """Print a table: figure, ours, baseline, target, and whether the target is met."""
    table = Table(title=title, caption=caption)
    for column in ("figure", "workerloader", "baseline", "target", "met"):
        table.add_column(column)
    for f in figures:
        baseline = _fmt(f.baseline, f.unit)
        if f.baseline_name:
            baseline += f" ({f.baseline_name})"
        target = (
            "-"
            if f.target is None
            else ("≥ " if f.higher_is_better else "≤ ") + _fmt(f.target, f.unit)
        )
        met = {None: "-", True: "yes", False: "NO"}[f.meets_target]
        table.add_row(f.name, _fmt(f.value, f.unit), baseline, target, met)
    (console or Console()).print(table)
