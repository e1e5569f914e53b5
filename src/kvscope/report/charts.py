"""kvscope's one plotting module: matplotlib figures written as static, self-contained SVG (the report's charts and the
quality benchmark's plot).

The SVG keeps its text as text (`svg.fonttype: none`), so a page that inlines it says what the chart says, and is
made to load nothing: no clip paths (they are references, `url(#...)`; every artist is drawn inside its axes
anyway), no metadata, ids from a fixed salt so the same data gives the same file. `titles` adds a hover text to the
group of any artist given that `gid`.

>>> fig, ax = figure(4, 2)
>>> _ = ax.plot([0, 1], [0, 1], gid="line-a")
>>> text = svg(fig, "demo", "a line", titles={"line-a": "from 0 to 1"})
>>> text.startswith('<svg id="demo" class="plot"') and "<title>from 0 to 1</title>" in text and "url(" not in text
True
"""

from __future__ import annotations

import html
import io
import re

# one colour per thing shown, shared by every chart
COLORS = {
    "allocated": "#1f6fb4", "reserved": "#e3780c", "nvml_used": "#2a9d3a", "rss": "#8456b8", "capacity": "#c8283b",
    "kv_cache": "#dd8452", "kv_budget": "#b8860b", "stored": "#1f6fb4", "evicted": "#e3780c", "weights": "#4c72b0",
    "activations": "#55a868", "other": "#8172b3", "fragmentation": "#a9a9a9",
}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363"]
PHASE_FILLS = ("#4c72b0", "#55a868", "#dd8452", "#8172b3", "#937860", "#da8bc3")
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "kvscope", "font.family": "sans-serif", "font.size": 10,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e6e9ed",
         "axes.axisbelow": True, "legend.frameon": False}

_CLIP = re.compile(r'\s*clip-path="url\(#[^)]*\)"')
_CLIP_DEFS = re.compile(r"<clipPath\b.*?</clipPath>", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_IDS = re.compile(r'(\bid="|xlink:href="#)([^"]+)"')


def figure(width: float, height: float, panels: int = 1):
    """(figure, axes) of `width` x `height` inches with kvscope's style, `panels` axes side by side (a list when more
    than one); no pyplot, so no global state."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, panels)
    return fig, (list(axes) if panels > 1 else axes)


def svg(fig, plot_id: str, title: str, *, titles: dict[str, str] | None = None) -> str:
    """The figure as one inline `<svg>` element with `plot_id`, an accessible `title`, and hover `titles` by gid."""
    import matplotlib

    for ax in fig.axes:
        for artist in ax.get_children():
            artist.set_clip_on(False)
    buf = io.StringIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = _METADATA.sub("", _CLIP_DEFS.sub("", _CLIP.sub("", text)))
    text = _IDS.sub(lambda m: f'{m.group(1)}{plot_id}-{m.group(2)}"', text)  # unique in a page of several charts
    for gid, tip in (titles or {}).items():
        tag = f'<g id="{plot_id}-{gid}">'
        text = text.replace(tag, f"{tag}<title>{html.escape(tip)}</title>", 1)
    head = (f'<svg id="{plot_id}" class="plot" role="img" aria-labelledby="{plot_id}-title" '
            'preserveAspectRatio="xMidYMid meet" ')
    text = text.replace("<svg ", head, 1)
    close = text.index(">", text.index("<svg")) + 1
    return text[:close] + f'<title id="{plot_id}-title">{html.escape(title)}</title>' + text[close:]


def byte_unit(hi: float) -> tuple[str, float]:
    """The binary unit a byte axis reaching `hi` is labelled in, and its size."""
    for unit, size in (("TiB", 1024.0**4), ("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if hi >= size:
            return unit, size
    return "B", 1.0


def tokens_text(v: float, _pos=None) -> str:
    """A token count as an axis says it: 4,096, 12.3k, 1.2M."""
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.3g}k"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:.3g}"
