"""Markdown and HTML from one list of blocks, so both forms of a report match.

Every piece of text is escaped for its target: HTML entities in HTML, and a
backslash before each character that would start markup in Markdown.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


class Code(str):
    """Text shown as code: a check id, run id or blob name."""


Inline = str | Code | list[str]


@dataclass
class Block:
    """One block of the report: heading, paragraph, list, table or image."""

    kind: str
    text: Inline = ""
    items: list[Inline] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[Inline]] = field(default_factory=list)
    level: int = 2


# Characters that would start markup. Underscores inside a word, as in check ids,
# start no emphasis in CommonMark, so only those at a word boundary are escaped.
MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|]|(?<!\w)_|_(?!\w))")


def markdown_inline(value: Inline) -> str:
    parts = value if isinstance(value, list) else [value]
    text = []
    for part in parts:
        if isinstance(part, Code):
            text.append(f"`{part.replace('`', '')}`")
        else:
            text.append(MARKDOWN_SPECIAL.sub(lambda m: "\\" + m[0], part))
    return "".join(text).replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            lines += ["#" * block.level + " " + markdown_inline(block.text), ""]
        elif block.kind == "paragraph":
            lines += [markdown_inline(block.text), ""]
        elif block.kind == "list":
            lines += [f"- {markdown_inline(item)}" for item in block.items] + [""]
        elif block.kind == "image":
            alt = markdown_inline(block.items[0])
            lines += [f"![{alt}]({block.text})", ""]
        elif block.kind == "table":
            lines += markdown_table(block) + [""]
    return "\n".join(lines)


def markdown_table(block: Block) -> list[str]:
    lines = ["| " + " | ".join(block.header) + " |",
             "|" + "---|" * len(block.header)]
    for row in block.rows:
        lines.append("| " + " | ".join(markdown_inline(cell) for cell in row) + " |")
    return lines


def html_inline(value: Inline) -> str:
    parts = value if isinstance(value, list) else [value]
    return "".join(
        f"<code>{html.escape(part)}</code>" if isinstance(part, Code)
        else html.escape(part)
        for part in parts
    )


HTML_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 110em; color: #212121; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bdbdbd; padding: 0.25em 0.5em; text-align: left;
         vertical-align: top; }
th { background: #eeeeee; }
code { font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
"""

# A rendered page loads nothing but images of its own origin and its inline style.
HTML_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"


def render_html(blocks: list[Block], title: str) -> str:
    body = [html_block(block) for block in blocks]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{HTML_POLICY}">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{HTML_STYLE}</style>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ])


def html_block(block: Block) -> str:
    if block.kind == "heading":
        return f"<h{block.level}>{html_inline(block.text)}</h{block.level}>"
    if block.kind == "paragraph":
        return f"<p>{html_inline(block.text)}</p>"
    if block.kind == "list":
        items = "".join(f"<li>{html_inline(item)}</li>" for item in block.items)
        return f"<ul>{items}</ul>"
    if block.kind == "image":
        # The image's id is its file name without the extension.
        name = html.escape(block.text, quote=True)
        alt = html.escape(block.items[0], quote=True)
        return (f'<figure><img id="{name.rsplit(".", 1)[0]}" src="{name}" '
                f'alt="{alt}"></figure>')
    header = "".join(f"<th>{html.escape(name)}</th>" for name in block.header)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html_inline(cell)}</td>" for cell in row) + "</tr>"
        for row in block.rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"
