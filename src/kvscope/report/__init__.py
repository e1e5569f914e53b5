"""The doctor's report: a self-contained HTML page and a JSON file, written atomically into one directory.

Use from the doctor::

    from kvscope.report import check_out_dir, write_report

    out = check_out_dir(args.out)        # at start: a UsageError naming --out before any expensive work
    ...                                  # run, measure, diagnose: build the report dict
    paths = write_report(out, report, snapshot_src=snapshot_tmp, move_snapshot=True)
    # {"json": out/report.json, "html": out/report.html, "snapshot": out/memory_snapshot.pickle}
"""

from __future__ import annotations

from kvscope.report.html import MEMORY_VIZ_URL, PLOT_IDS, render_html
from kvscope.report.write import REPORT_HTML, REPORT_JSON, SNAPSHOT_NAME, check_out_dir, write_report

__all__ = [
    "MEMORY_VIZ_URL",
    "PLOT_IDS",
    "REPORT_HTML",
    "REPORT_JSON",
    "SNAPSHOT_NAME",
    "check_out_dir",
    "render_html",
    "write_report",
]
