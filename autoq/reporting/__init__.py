"""Run outputs: tables (trials.csv, pareto.csv), exported front points, and the HTML report."""

from autoq.reporting.html import write_html, write_sensitivity_html
from autoq.reporting.tables import TRIAL_COLUMNS, trials_frame

__all__ = ["TRIAL_COLUMNS", "trials_frame", "write_html", "write_sensitivity_html"]
