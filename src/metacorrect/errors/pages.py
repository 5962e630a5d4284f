"""Pictures of suspected label errors: an HTML and a Markdown page for the run folder.

* For image data (inputs ``N × 1|3 × H × W``): the top suspected errors as thumbnails, each
  captioned *given → suggested* with its error probability (PNG files in
  ``label_errors_thumbs/``, written by a small built-in PNG encoder: no dependency).
* For every dataset: a figure of the estimated number of label errors per (true, given)
  class pair (``label_errors_pairs.png``, matplotlib — the ``report`` extra; without it the
  pages carry the same numbers as a table and say how to get the figure) and the table.

:func:`build_pages` returns the files as bytes (relative name → content) without writing
anything; :func:`commit_files` writes a set of files atomically.
"""

from __future__ import annotations

import html
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np

from ..report.html import CSS
from .scoring import LabelErrors

HTML_FILE, MD_FILE, FIGURE_FILE, THUMBS_DIR = ("label_errors.html", "label_errors.md", "label_errors_pairs.png",
                                              "label_errors_thumbs")
THUMB_MIN, THUMB_MAX = 64, 128  # thumbnail edge in pixels: small images are enlarged, big ones reduced

PAGE_CSS = CSS + """
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 132px; border: 1px solid #ddd; padding: 4px; text-align: center; font-size: 0.8em; }
.card img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #000; }
.card .lab { font-weight: 600; }
.card .p { color: #a00; }
.card .idx { color: #666; word-break: break-all; }
"""


class PagesDependencyError(RuntimeError):
    """matplotlib (the ``report`` extra) is not installed."""


# ----------------------------------------------------------------------------- images
def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``H × W`` (grey) or ``H × W × 3`` (RGB) uint8 array as PNG."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    colour = 0 if image.ndim == 2 else 2
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def is_image_data(x) -> bool:
    """Inputs shaped ``N × C × H × W`` with 1 or 3 channels."""
    return getattr(x, "ndim", 0) == 4 and x.shape[1] in (1, 3) and min(x.shape[2:]) >= 2


def thumbnail(x) -> np.ndarray:
    """One ``C × H × W`` input (uint8, or floats in [0, 1] — others are min-max scaled) as a
    displayable uint8 ``H × W`` or ``H × W × 3`` array, enlarged (nearest neighbour) to at
    least 64 pixels or reduced (striding) to at most 128."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        a = np.rint(a * 255).astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    edge = max(a.shape[:2])
    if edge < THUMB_MIN:
        f = -(-THUMB_MIN // edge)
        a = a.repeat(f, 0).repeat(f, 1)
    elif edge > THUMB_MAX:
        f = -(-edge // THUMB_MAX)
        a = a[::f, ::f]
    return a


# ----------------------------------------------------------------------------- figure
def pairs_figure(errors: LabelErrors, class_names: list[str]) -> bytes:
    """PNG heat map of the estimated number of errors per (true, given) pair (diagonal blank)."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise PagesDependencyError("the figure of errors per class pair needs matplotlib, an optional dependency: "
                                   "pip install 'metacorrect[report]'") from None
    C = errors.num_classes
    names = [str(n)[:12] for n in class_names]
    off = errors.pairs.astype(float).copy()
    np.fill_diagonal(off, np.nan)
    shown = np.where(off >= 0.5, off, np.nan)  # below half an example: blank, as the diagonal
    size = min(3.2 + 0.42 * C, 14)
    fig = Figure(figsize=(size + 1.2, size), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Reds", vmin=0, vmax=max(float(np.nanmax(off)) if np.isfinite(off).any() else 1, 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="estimated label errors")
    ticks = np.arange(C)
    ax.set_xticks(ticks, names, rotation=90 if C > 10 or max(map(len, names)) > 3 else 0, fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("given label")
    ax.set_ylabel("true class (estimated)")
    ax.set_title("estimated label errors per (true, given) pair", fontsize=10)
    if C <= 20:
        top = np.nanmax(off) if np.isfinite(off).any() else 0
        for i in range(C):
            for j in range(C):
                if i != j and off[i, j] >= 0.5:
                    ax.text(j, i, f"{off[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if off[i, j] > 0.6 * top else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- pages
def build_pages(errors: LabelErrors, index: np.ndarray, class_names: list[str], *, title: str, summary: str,
                images=None, image_rows=None, paths: list[str] | None = None, top: int = 48,
                figure: bool = True) -> tuple[dict[str, bytes], str | None]:
    """The pages' files as ``{relative name: bytes}`` and a note (``None``, or why the figure
    is missing).

    ``images``: inputs (``M × C × H × W``; thumbnails are made only for such image data) with
    ``image_rows[n]`` the row of scored example ``n`` (default: ``n``), or ``None``;
    ``top``: how many suspected errors to show.
    """
    e = html.escape
    names = [str(n) for n in class_names]
    shown = [int(n) for n in errors.order if errors.is_suspected[n]][:max(int(top), 0)]
    files: dict[str, bytes] = {}
    note = None
    if figure:
        try:
            files[FIGURE_FILE] = pairs_figure(errors, names)
        except PagesDependencyError as exc:
            note = str(exc)

    def where(n: int) -> str:
        return f"#{int(index[n])}" + (f" {Path(paths[n]).name}" if paths is not None else "")

    cards, md_rows = [], []
    with_images = images is not None and is_image_data(images)
    for rank, n in enumerate(shown, 1):
        g, s, p = names[errors.given[n]], names[errors.suggested[n]], errors.error_probability[n]
        thumb = ""
        if with_images:
            thumb = f"{THUMBS_DIR}/{rank:04d}.png"
            files[thumb] = png_bytes(thumbnail(images[int(image_rows[n]) if image_rows is not None else n]))
        title_attr = e(paths[n]) if paths is not None else f"index {int(index[n])}"
        img = f'<img src="{e(thumb)}" alt="{e(g)} → {e(s)}">' if thumb else ""
        cards.append(f'<div class="card" title="{title_attr}">{img}<div class="lab">{e(g)} → {e(s)}</div>'
                     f'<div class="p">p(error) {p:.3f}</div><div class="idx">{e(where(n))}</div></div>')
        md_img = f"![{g} → {s}]({thumb})" if thumb else ""
        md_rows.append(f"| {rank} | {md_img} | {where(n)} | {g} → {s} | {p:.3f} |")

    C = errors.num_classes
    pair_table = None
    if C <= 20:
        head = ["true \\ given"] + names
        rows = [[names[i]] + ["·" if i == j else f"{errors.pairs[i, j]:.0f}" for j in range(C)] for i in range(C)]
        pair_table = (head, rows)
    conf = errors.confusions(10)

    # HTML
    body = [f"<h1>{e(title)}</h1>", f"<pre>{e(summary)}</pre>",
            f"<h2>Top {len(shown)} suspected label errors</h2>",
            "<p>Sorted by error probability, 1 − P(true = given | x, given); each shows the given label → the most "
            "probable other true class. The index is the example's row in your data (see label_errors.csv).</p>",
            '<div class="grid">' + "\n".join(cards) + "</div>" if cards else "<p>No example is flagged.</p>",
            "<h2>Estimated label errors per (true, given) class pair</h2>",
            "<p>For each given label j, the sum over its examples of P(true = i | x, given = j): the number of "
            "examples of true class i labelled j, as the posteriors estimate it (the diagonal, the right labels, "
            "is left out).</p>"]
    if FIGURE_FILE in files:
        body.append(f'<figure><img src="{FIGURE_FILE}" alt="errors per class pair"></figure>')
    elif note:
        body.append(f'<p class="notes">{e(note)}</p>')
    if pair_table:
        head, rows = pair_table
        body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    else:
        body.append("<p>Largest: " + e(", ".join(f"{names[i]} → {names[j]}: {n:.0f}" for i, j, n in conf)) + "</p>")
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{PAGE_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
    files[HTML_FILE] = page.encode()

    # Markdown
    md = [f"# {title}\n", "```\n" + summary.rstrip() + "\n```\n", f"## Top {len(shown)} suspected label errors\n",
          "Sorted by error probability, 1 − P(true = given | x, given): given label → the most probable other "
          "true class. The index is the example's row in your data (see label_errors.csv).\n"]
    if md_rows:
        md.append("| rank | image | index | given → suggested | p(error) |\n|---:|---|---|---|---:|\n"
                  + "\n".join(md_rows) + "\n")
    else:
        md.append("No example is flagged.\n")
    md.append("## Estimated label errors per (true, given) class pair\n")
    md.append("For each given label j, the sum over its examples of P(true = i | x, given = j) (the diagonal, "
              "the right labels, is left out).\n")
    if FIGURE_FILE in files:
        md.append(f"![errors per class pair]({FIGURE_FILE})\n")
    elif note:
        md.append(f"<sub>{note}</sub>\n")
    if pair_table:
        head, rows = pair_table
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        md.append("| " + " | ".join(esc(h) for h in head) + " |\n|" + "|".join(["---"] + ["---:"] * C) + "|\n"
                  + "\n".join("| " + " | ".join(esc(c) for c in r) + " |" for r in rows) + "\n")
    else:
        md.append("Largest: " + ", ".join(f"{names[i]} → {names[j]}: {n:.0f}" for i, j, n in conf) + "\n")
    files[MD_FILE] = "\n".join(md).encode()
    return files, note


def commit_files(root: Path, files: dict[str, bytes], replace_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Write ``files`` (``{path relative to root: bytes}``) under ``root`` atomically: all are
    first written to a staging folder in ``root``, then moved into place; the folders named
    in ``replace_dirs`` are replaced as a whole (stale thumbnails do not survive). If a
    write fails, nothing is moved and the staging folder is removed."""
    root = Path(root)
    stage = root / ".label_errors.staging"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        for rel, data in files.items():
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    written = []
    try:
        for d in replace_dirs:
            if (stage / d).is_dir() or (root / d).exists():
                shutil.rmtree(root / d, ignore_errors=True)
                if (stage / d).is_dir():
                    os.replace(stage / d, root / d)
                    written.append(root / d)
        for rel in files:
            if rel.split("/")[0] in replace_dirs:
                continue
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, root / rel)
            written.append(root / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written
