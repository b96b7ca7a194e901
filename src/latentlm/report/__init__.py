"""Reports across runs: the grid command's table and plots."""

from latentlm.report.grid import run_grid, write_report

__all__ = ["run_grid", "write_report"]
