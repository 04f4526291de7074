"""Run outputs: tables (trials.csv, pareto.csv), exported front points, and the HTML report."""

from autoq.report.html import write_html, write_sensitivity_html
from autoq.report.tables import TRIAL_COLUMNS, trials_frame

__all__ = ["TRIAL_COLUMNS", "trials_frame", "write_html", "write_sensitivity_html"]
