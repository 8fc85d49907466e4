"""Tables (Markdown, printed and optionally appended to bench/RESULTS.md)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from bench.suite.model import Config
from bench.suite.scenarios import Scenario
from bench.suite.stats import Figure

RESULTS = Path(__file__).resolve().parents[1] / "RESULTS.md"
HEADER = "| system | configuration | guarantees | {unit}: median (min–max) | DTask / peer |"

Row = tuple[Config, Figure | None, str]  # config, figure, error message ("" if none)


def ratio(reference: Figure | None, figure: Figure | None) -> str:
    if reference is None or figure is None or figure.median <= 0:
        return "—"
    return f"{reference.median / figure.median:.2f}×"


def table(scenario: Scenario, rows: list[Row], title_args: dict) -> str:
    ref = next((fig for cfg, fig, _ in rows if cfg.name == scenario.reference), None)
    lines = [f"### {scenario.title.format(**title_args)}", "",
             HEADER.format(unit=scenario.unit), "|---|---|---|---|---|"]
    for cfg, fig, err in rows:
        figure = fig.text() if fig else f"failed: {err}"
        peer = "—" if cfg.name == scenario.reference else ratio(ref, fig)
        lines.append(f"| {cfg.name} | {cfg.setup} | {cfg.guarantees} | {figure} | {peer} |")
    return "\n".join(lines)


def preamble(command: str, versions: dict[str, str]) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (f"`{command}` — {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}; {vers}")


def append_results(text: str) -> None:
    with RESULTS.open("a") as f:
        f.write(f"\n## Side by side with the peers ({time.strftime('%Y-%m-%d')})\n\n")
        f.write(text.rstrip() + "\n")
