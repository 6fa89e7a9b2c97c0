"""``report.html``: the report's markdown as one self-contained HTML page, every figure inlined
as a ``data:`` URI (``markdown_to_html``).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

__all__ = [
    "markdown_to_html",
]


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: 0 .25em; border-radius: 3px; font-size: 90%; }
blockquote { border-left: 4px solid #d33; margin: .8em 0; padding: .2em 1em; background: #fff4f4; }
img { max-width: 100%; height: auto; display: block; margin: .6em 0; }
"""
_INLINE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|`([^`]+)`|\*\*(.+?)\*\*")


def markdown_to_html(text: str, base_dir: Path, *, title: str = "report") -> str:
    """A self-contained HTML page of the markdown ``text`` that ``write_report`` writes.

    Handles that subset: ``#``/``##``/``###`` headings, paragraphs, ``- `` lists, ``> ``
    quotes, pipe tables (``\\|`` for a literal pipe in a cell), and inline ``code``,
    ``**bold**``, links and images. An image ``![alt](file.png)`` is read from ``base_dir`` and
    embedded as a ``data:image/png;base64,...`` URI, so the page loads nothing else; an image
    that cannot be read becomes its alt text. All other text is HTML-escaped.
    """

    def inline(s: str) -> str:
        out, pos = [], 0
        for m in _INLINE.finditer(s):
            out.append(html.escape(s[pos : m.start()]))
            alt, src, label, href, code, bold = m.groups()
            if src is not None:
                out.append(_img_tag(base_dir, src, alt))
            elif href is not None:
                out.append(f'<a href="{html.escape(href)}">{inline(label)}</a>')
            elif code is not None:
                out.append(f"<code>{html.escape(code)}</code>")
            else:
                out.append(f"<strong>{inline(bold)}</strong>")
            pos = m.end()
        out.append(html.escape(s[pos:]))
        return "".join(out)

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [inline(p.strip().replace("\\|", "|")) for p in parts]

    body: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        first = lines[0]
        heading = re.match(r"(#{1,6})\s+(.*)", first)
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            body.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif all(line.lstrip().startswith("|") for line in lines):
            rows = [cells(line) for line in lines if not re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", line)]
            head, rest = rows[0], rows[1:]
            body.append("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")  # fmt: skip
        elif all(line.startswith(">") for line in lines):
            body.append("<blockquote>" + "<br>".join(inline(line[1:].strip()) for line in lines) + "</blockquote>")
        elif all(line.startswith("- ") for line in lines):
            body.append("<ul>" + "".join(f"<li>{inline(line[2:])}</li>" for line in lines) + "</ul>")
        else:  # a paragraph, or a heading / list / text run without blank lines between
            items: list[str] = []
            for line in lines:
                if line.startswith("- "):
                    items.append(f"<li>{inline(line[2:])}</li>")
                    continue
                if items:
                    body.append("<ul>" + "".join(items) + "</ul>")
                    items = []
                h = re.match(r"(#{1,6})\s+(.*)", line)
                if h:
                    body.append(f"<h{len(h.group(1))}>{inline(h.group(2))}</h{len(h.group(1))}>")
                else:
                    body.append(f"<p>{inline(line)}</p>")
            if items:
                body.append("<ul>" + "".join(items) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")  # fmt: skip


def _img_tag(base_dir: Path, src: str, alt: str) -> str:
    """``<img>`` with the PNG ``base_dir/src`` inlined as a data URI, or ``alt`` (escaped) when
    ``src`` is not a readable file name inside ``base_dir``."""
    path = base_dir / src
    if "/" in src or "\\" in src or not path.is_file():
        return f"<em>[{html.escape(alt)}: {html.escape(src)} missing]</em>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
