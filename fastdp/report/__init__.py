"""Reports of federated runs: a summary table, plots (Dice, epsilon, time per round), the attack grid.

    from fastdp.report import write_report
    write_report("runs/demo")          # -> runs/demo/report.md, runs/demo/plots/*.png

Needs matplotlib for the plots (``pip install matplotlib``).
"""

from fastdp.report.markdown import attack_metric_rows, load_attack_results, markdown_table, write_report
from fastdp.report.summary import ModeSummary, RunHistory, find_runs, load_history, summarize, summarize_all

__all__ = [
    "ModeSummary",
    "RunHistory",
    "attack_metric_rows",
    "find_runs",
    "load_attack_results",
    "load_history",
    "markdown_table",
    "summarize",
    "summarize_all",
    "write_report",
]
