"""An HTML contact sheet of duplicate groups: people would rather look than read.

One self-contained file (thumbnails inlined as JPEG data URIs, no scripts, no
external assets), so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from simserve.atomic import atomic_write
from simserve.inference.decode import DecodeError, decode_image


def _thumb(path: Path, side: int) -> str:
    try:
        img = decode_image(path.read_bytes(), min_side=side)
    except (DecodeError, OSError):
        return ""
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


CSS = """
body{font:14px system-ui,sans-serif;margin:24px;background:#f6f6f6;color:#222}
h1{font-size:20px} .group{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px;margin:0 0 16px}
.members{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;width:172px}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;border:3px solid transparent;border-radius:4px}
figure.keep img{border-color:#2a9d4b} figcaption{font-size:12px;word-break:break-all}
.badge{background:#2a9d4b;color:#fff;border-radius:3px;padding:0 4px;font-size:11px}
.pairs{font-size:12px;color:#555;margin-top:8px}
"""


def write_contact_sheet(groups: list[dict], folder: str | os.PathLike, out: str | os.PathLike, max_groups: int = 1000, side: int = 160) -> None:
    folder = Path(folder)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>simserve dedupe</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{len(groups)} duplicate groups in {html.escape(str(folder))}</h1>",
        "<p>Green: the suggested file to keep (highest resolution, then largest file). Scores: the fusion head, 1 = copy.</p>",
    ]
    for g in groups[:max_groups]:
        parts.append(f"<section class='group' id='g{g['group']}'><h2>Group {g['group']} &middot; {len(g['members'])} files</h2><div class='members'>")
        for m in g["members"]:
            keep = m["path"] == g["keep"]
            src = _thumb(folder / m["path"], side)
            parts.append(
                f"<figure class='{'keep' if keep else ''}'><img alt='{html.escape(m['path'])}' src='{src}'>"
                f"<figcaption>{'<span class=badge>keep</span> ' if keep else ''}{html.escape(m['path'])}<br>"
                f"{m['width']}&times;{m['height']}, {m['bytes'] / 1024:.0f} KB</figcaption></figure>"
            )
        pairs = ", ".join(f"{html.escape(Path(a).name)} ~ {html.escape(Path(b).name)}: {sc:.3f}" for a, b, sc in g["pairs"][:20])
        parts.append(f"</div><div class='pairs'>{pairs}</div></section>")
    if len(groups) > max_groups:
        parts.append(f"<p>{len(groups) - max_groups} more groups in the JSONL output.</p>")
    parts.append("</body></html>")
    atomic_write(out, "\n".join(parts))
