"""A single self-contained HTML page of the validation results, rendered from summary.json.

Not GX data docs: those need a file-backed GX project and load Bootstrap, jQuery and Vega
from CDNs, so they render blank offline. This page has inline CSS, no scripts, and is built
from the same dictionary as summary.json, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 .pass, td.pass { color: #17692f; } h1 .fail, td.fail { color: #b3261e; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.fail { background: #fdecea; }
code, .examples { font-family: ui-monospace, monospace; font-size: 0.85rem; }
ul.failures li { margin-bottom: 0.3rem; }
"""


def _verdict(success: bool) -> str:
    return "pass" if success else "fail"


def _counts_table(images: Mapping[str, int]) -> str:
    header = "".join(f"<th>{escape(k)}</th>" for k in images)
    cells = "".join(f"<td>{v}</td>" for v in images.values())
    return f"<table><tr>{header}</tr><tr>{cells}</tr></table>"


def _expectation_row(entry: Mapping[str, Any]) -> str:
    verdict = _verdict(bool(entry.get("success")))
    examples = entry.get("unexpected_examples") or []
    detail = entry.get("error") or "<br>".join(escape(str(e)) for e in examples)
    if entry.get("unexpected_count") is not None:
        count = f"{entry['unexpected_count']} / {entry.get('element_count')}"
    else:
        count = escape(str(entry.get("observed_value") or ""))
    return (
        f'<tr class="{verdict}"><td class="{verdict}">{verdict.upper()}</td>'
        f"<td><code>{escape(str(entry.get('suite', '')))}</code></td>"
        f"<td><code>{escape(str(entry.get('expectation', '')))}</code></td>"
        f"<td>{escape(str(entry.get('column') or ''))}</td>"
        f"<td>{escape(str(entry.get('check', '')))}</td>"
        f'<td>{count}</td><td class="examples">{detail}</td></tr>'
    )


def _domain_section(domain: str, report: Mapping[str, Any]) -> str:
    rows = "".join(_expectation_row(e) for e in report.get("expectations", []))
    verdict = _verdict(bool(report.get("success")))
    return (
        f'<h2>{escape(domain)}: <span class="{verdict}">{verdict.upper()}</span></h2>'
        f"{_counts_table(report.get('images', {}))}"
        "<table><tr><th>result</th><th>suite</th><th>expectation</th><th>column</th>"
        "<th>check</th><th>unexpected / rows</th><th>unexpected examples</th></tr>"
        f"{rows}</table>"
    )


def _cross_domain_section(cross: Mapping[str, Any]) -> str:
    if not cross:
        return ""
    items = "".join(
        f"<tr><th>{escape(key)}</th><td>{escape(_text(value))}</td></tr>"
        for key, value in cross.items()
    )
    return f"<h2>cross-domain</h2><table>{items}</table>"


def _text(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)


def render_html(summary: Mapping[str, Any]) -> str:
    verdict = _verdict(bool(summary.get("success")))
    failures = summary.get("failures") or []
    failure_list = "".join(f"<li>{escape(str(line))}</li>" for line in failures)
    domains = "".join(
        _domain_section(domain, report) for domain, report in summary.get("domains", {}).items()
    )
    labels = ", ".join(escape(str(label)) for label in summary.get("labels", []))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>roadshift data validation: {verdict}</title><style>{STYLE}</style></head><body>"
        f'<h1>Data validation: <span class="{verdict}">{verdict.upper()}</span></h1>'
        f"<p>Classes: {labels or '(none)'}</p>"
        + (f'<h2>Problems</h2><ul class="failures">{failure_list}</ul>' if failures else "")
        + domains
        + _cross_domain_section(summary.get("cross_domain", {}))
        + "</body></html>\n"
    )


def write_html_report(path: Path, summary: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(summary), encoding="utf-8")
    tmp.replace(path)
    return path
