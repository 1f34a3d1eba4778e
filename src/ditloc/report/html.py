"""The report page: one self-contained HTML file (figures embedded as base64
data URIs, inline style and script, nothing fetched from anywhere).

A small inline script marks the page when it has loaded: on ``<html>`` it sets
``data-images-total``, ``data-images-loaded`` (decoded, ``naturalWidth > 0``,
and laid out with a width) and ``data-report-status`` = ``ok`` when every
image loaded and no error was raised, else ``broken``. A headless browser's
dumped DOM shows whether the page works.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.92em; } td, th { border: 1px solid #ddd; padding: 0.3em 0.6em; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.none { color: #a33; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
ul.prompts { font-size: 0.88em; color: #444; }
"""

SCRIPT = """
(function () {
  var root = document.documentElement, failed = false;
  window.addEventListener("error", function () { failed = true; }, true);  // capture: image load errors too
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (im) {
      return im.complete && im.naturalWidth > 0 && im.getBoundingClientRect().width > 0;
    }).length;
    root.setAttribute("data-images-total", String(images.length));
    root.setAttribute("data-images-loaded", String(loaded));
    root.setAttribute("data-report-status", !failed && loaded === images.length ? "ok" : "broken");
  });
})();
"""


@dataclass(frozen=True)
class Figure:
    """A PNG on disk with its heading and caption (plain text)."""

    path: Path
    title: str
    caption: str = ""
    notes: tuple[str, ...] = ()  # e.g. the prompts of a grid's rows, shown as a list


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure(fig: Figure) -> str:
    notes = ""
    if fig.notes:
        notes = '<ul class="prompts">' + "".join(f"<li>{html.escape(n)}</li>" for n in fig.notes) + "</ul>"
    return (f'<figure><img src="{data_uri(fig.path)}" alt="{html.escape(fig.title, quote=True)}">'
            f"<figcaption>{html.escape(fig.caption)}</figcaption>{notes}</figure>")


def table(header: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]]) -> str:
    """`rows`: cells as (text, css class)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{cls}">{html.escape(text)}</td>' for text, cls in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(*, title: str, meta: str, sections: Sequence[tuple[str, str, Sequence]], settings: dict) -> str:
    """`sections`: (heading, intro text, items), an item a Figure or a ready HTML string (a table)."""
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(meta)}</p>']
    for heading, intro, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if intro:
            parts.append(f"<p>{html.escape(intro)}</p>")
        for item in items:
            parts.append(_figure(item) if isinstance(item, Figure) else item)
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(settings, indent=1)) + "</pre>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
        "<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )

