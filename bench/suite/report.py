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

Row = tuple[Config, "Figure | dict[str, Figure] | None", str]  # config, result, error
LATENCY_HEADER = ("| system | configuration | guarantees | p50 ms | p99 ms | p99.9 ms "
                  "| p99 peer / DTask (> 1: DTask's p99 is lower) |")
FAILOVER_HEADER = ("| system | configuration | guarantees | recovery s: median (min–max) "
                   "| acknowledged submissions per run | lost (acknowledged, then unknown) |")


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


def latency_table(scenario: Scenario, rows: list[Row], title_args: dict) -> str:
    ref = next((res for cfg, res, _ in rows if cfg.name == scenario.reference), None)
    lines = [f"### {scenario.title.format(**title_args)}", "", LATENCY_HEADER,
             "|---|---|---|---|---|---|---|"]
    for cfg, res, err in rows:
        if not res:
            lines.append(f"| {cfg.name} | {cfg.setup} | {cfg.guarantees} | failed: {err} "
                         "| | | — |")
            continue
        cells = " | ".join(res[k].text(",.2f") for k in ("p50", "p99", "p99.9"))
        peer = "—" if cfg.name == scenario.reference else (
            ratio(res["p99"], ref["p99"]) if ref else "—")
        lines.append(f"| {cfg.name} | {cfg.setup} | {cfg.guarantees} | {cells} | {peer} |")
    return "\n".join(lines)


def failover_table(scenario: Scenario, rows: list[Row], title_args: dict,
                   without: list[str]) -> str:
    lines = [f"### {scenario.title.format(**title_args)}", "", FAILOVER_HEADER,
             "|---|---|---|---|---|---|"]
    for cfg, res, err in rows:
        if not res:
            lines.append(f"| {cfg.name} | {cfg.setup} | {cfg.guarantees} | failed: {err} | | |")
            continue
        lost = int(sum(res["lost"].samples))
        lines.append(f"| {cfg.name} | 3 schedulers, leader SIGKILLed once per run, no worker "
                     f"| {cfg.guarantees} | {res['recovery_s'].text(',.2f')} "
                     f"| {res['acked'].text()} | {lost} in {len(res['lost'].samples)} run(s) |")
    if without:
        lines.append(f"| {', '.join(without)} | one broker (Redis / PostgreSQL) | not "
                     "replicated | not applicable: no replicated broker to fail over to; "
                     "losing the node stops submissions until it is back | — | — |")
    return "\n".join(lines)


NOT_APPLICABLE = "peers: not applicable (no replicated state / no write-behind mirror)"


def _dtask_only_table(scenario: Scenario, rows: list[Row], title_args: dict,
                      columns: list[str], cells) -> str:
    """A table of the DTask-only scenarios: `cells(result)` gives a row's figures."""
    blank = " |" * (len(columns) - 1)
    lines = [f"### {scenario.title.format(**title_args)}", "",
             "| system | guarantees | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for cfg, res, err in rows:
        if not res:
            lines.append(f"| {cfg.name} | {cfg.guarantees} | failed: {err} |{blank}")
            continue
        lines.append(f"| {cfg.name} | {cfg.guarantees} | " + " | ".join(cells(res)) + " |")
    lines.append(f"| {NOT_APPLICABLE} | |{blank} |")
    return "\n".join(lines)


def scale_table(scenario: Scenario, rows: list[Row], title_args: dict) -> str:
    def cells(res: dict) -> list[str]:
        disp = f"{res['dispatch'].median:,.0f}" if "dispatch" in res else "not run"
        return [f"{res['overall'].median:,.0f}", f"{res['first10'].median:,.0f}",
                f"{res['last10'].median:,.0f}",
                f"{res['rss_mib'].median:,.0f} ({res['rss_start_mib'].median:,.0f})",
                f"{res['bytes_per_task'].median:,.0f}", disp]

    return _dtask_only_table(scenario, rows, title_args, [
        "submit_many tasks/s: overall", "first 10% of calls", "last 10% of calls",
        "leader RSS MiB (at start)", "leader bytes per pending task",
        "dispatch tasks/s with them pending"], cells)


def persist_table(scenario: Scenario, rows: list[Row], title_args: dict) -> str:
    def cells(res: dict) -> list[str]:
        return [f"{res['lag_p50'].median:.3f}", f"{res['lag_p99'].median:.3f}",
                f"{res['lag_max'].median:.3f}", f"{res['rows_per_s'].median:,.0f}",
                f"{res['submitted_per_s'].median:,.0f}", f"{res['drain_s'].median:.2f}"]

    return _dtask_only_table(scenario, rows, title_args, [
        "lag p50 s", "lag p99 s", "lag max s", "rows written/s", "submitted/s",
        "drained after load s"], cells)


def render(scenario: Scenario, rows: list[Row], title_args: dict,
           without: list[str]) -> str:
    if scenario.kind == "latency":
        return latency_table(scenario, rows, title_args)
    if scenario.kind == "failover":
        return failover_table(scenario, rows, title_args, without)
    if scenario.kind == "scale":
        return scale_table(scenario, rows, title_args)
    if scenario.kind == "persist":
        return persist_table(scenario, rows, title_args)
    return table(scenario, rows, title_args)


def preamble(command: str, versions: dict[str, str]) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (f"`{command}` — {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}; {vers}")


def append_results(text: str) -> None:
    with RESULTS.open("a") as f:
        f.write(f"\n## Side by side with the peers ({time.strftime('%Y-%m-%d')})\n\n")
        f.write(text.rstrip() + "\n")
