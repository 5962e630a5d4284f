"""Render a report document (headings, paragraphs, tables, figures) as Markdown or HTML.

A document is a list of blocks::

    ("h", level, text)            a heading
    ("p", text)                   a paragraph (plain text)
    ("table", headers, rows, notes)  rows are lists of strings; notes a list of footnotes
    ("img", file, caption)        a figure (a path relative to the report folder)
    ("pre", text)                 preformatted text
"""

from __future__ import annotations

import html

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 0.3em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child, td.text { text-align: left; }
tr.published td { font-style: italic; color: #555; background: #fafafa; }
tr.mean td { font-weight: 600; }
.notes { font-size: 0.85em; color: #555; margin: 0 0 1em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _row_class(row) -> str:
    first = " ".join(row[:3]).lower()
    if "published" in first:
        return "published"
    if "mean" in first:
        return "mean"
    return ""


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2] + "\n")
        elif kind == "p":
            out.append(b[1] + "\n")
        elif kind == "pre":
            out.append("```\n" + b[1].rstrip() + "\n```\n")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
        elif kind == "table":
            headers, rows, notes = b[1], b[2], b[3]
            esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
                     "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
            for row in rows:
                lines.append("| " + " | ".join(esc(c) for c in row) + " |")
            out.append("\n".join(lines) + "\n")
            for n in notes or []:
                out.append(f"<sub>{n}</sub>\n")
    return "\n".join(out)


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    body = []
    figures_open = False
    for b in blocks:
        kind = b[0]
        if kind != "img" and figures_open:
            body.append("</div>")
            figures_open = False
        if kind == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif kind == "pre":
            body.append(f"<pre>{e(b[1])}</pre>")
        elif kind == "img":
            if not figures_open:
                body.append('<div class="figures">')
                figures_open = True
            body.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
        elif kind == "table":
            headers, rows, notes = b[1], b[2], b[3]
            t = ["<table>", "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in headers) + "</tr>"]
            for row in rows:
                cls = _row_class([str(c) for c in row])
                t.append(f'<tr class="{cls}">' + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
            t.append("</table>")
            body.append("\n".join(t))
            if notes:
                body.append('<p class="notes">' + "<br>".join(e(n) for n in notes) + "</p>")
    if figures_open:
        body.append("</div>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


__all__ = ["to_html", "to_markdown"]
