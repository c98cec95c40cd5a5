"""report.html: report.md's tables as HTML tables and its plots embedded, so the page stands alone."""

import base64
from pathlib import Path

from rlhf.report import check_targets, render_html, render_markdown

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_html_has_the_tables_and_embeds_the_plots(tmp_path: Path):
    (tmp_path / "plots").mkdir()
    plots = [tmp_path / "plots" / "accuracy_vs_time.png", tmp_path / "plots" / "grpo.png"]
    for p in plots:
        p.write_bytes(PNG)
    stages = {"sft": {"accuracy": 0.5, "wall_s": 10.0}, "grpo": {"accuracy": 0.25, "wall_s": 20.0}}
    page = render_markdown(stages, check_targets(stages, 30.0), plots, tmp_path, 30.0)
    assert "](plots/grpo.png)" in page  # report.md links the files

    html = render_html(page, tmp_path)
    assert html.startswith("<!doctype html>") and html.count("<table>") == 2
    assert "<th>checkpoint</th>" in html and "<td>GRPO (verifier)</td>" in html
    assert "<strong>no</strong>" in html  # the GRPO gain target, missed
    assert html.count("data:image/png;base64," + base64.b64encode(PNG).decode()) == 2
    assert "plots/grpo.png" not in html
