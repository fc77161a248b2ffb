"""The HTML diagnostics report: one self-contained page with the verdict, plots and tables."""
from pyro_lag.report.render import (
    Verdict,
    collapse_verdict,
    perplexity,
    render_report,
    write_report,
)

__all__ = ["Verdict", "collapse_verdict", "perplexity", "render_report", "write_report"]
