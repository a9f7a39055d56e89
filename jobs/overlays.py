"""Overlay pictures of one scored slide: attention map, chosen tiles and glimpse trails on the thumbnail.

Used by training (a few validation slides per epoch, logged to MLflow), evaluation and serving. No Ray,
no pyplot state: figures are built with ``matplotlib.figure.Figure`` and written by the Agg canvas, so
this is safe in worker processes and threads.

Coordinates: boxes and glimpse trails come in level-0 pixels and are drawn on the thumbnail through
``dual_attention.slides.level0_to_thumb_rc`` (the one mapping between the frames); with matplotlib's
``imshow`` a thumbnail pixel (row, col) has its centre at plot (x=col, y=row).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless everywhere; harmless when already set

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from dual_attention.slides import Level0Box, level0_to_thumb_rc  # noqa: E402

_TILE_COLOURS = ("#00e5ff", "#ffea00", "#ff4081", "#76ff03", "#ff9100", "#d500f9", "#ffffff", "#1de9b6")


def _box_corners_thumb(box: Level0Box, downsample: int) -> tuple[float, float, float, float]:
    """(col0, row0, width, height) of a level-0 box on the thumbnail, in plot units."""
    row0, col0 = level0_to_thumb_rc(box.x0, box.y0, downsample)
    row1, col1 = level0_to_thumb_rc(box.x0 + box.width, box.y0 + box.height, downsample)
    return col0, row0, col1 - col0, row1 - row0


def overlay_figure(
    thumbnail_rgb: np.ndarray,
    attention_map: np.ndarray | None,
    level0_boxes: Sequence[Level0Box],
    downsample: int,
    glimpse_trails_level0: Sequence[Sequence[tuple[float, float]]] | None = None,
    tile_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Two panels: the thumbnail with the chosen tiles (numbered, optionally labelled with their predicted
    class) and each tile's glimpse trail (start marked by a circle, end by a cross); and the attention map
    over a faded thumbnail with the same tiles."""
    thumbnail_rgb = np.asarray(thumbnail_rgb)
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise ValueError(f"thumbnail_rgb must be (h, w, 3), got shape {thumbnail_rgb.shape}")
    has_attention = attention_map is not None and np.asarray(attention_map).size > 0
    if has_attention and np.asarray(attention_map).shape != thumbnail_rgb.shape[:2]:
        raise ValueError(
            f"attention_map shape {np.asarray(attention_map).shape} != thumbnail shape {thumbnail_rgb.shape[:2]}"
        )
    if glimpse_trails_level0 is not None and len(glimpse_trails_level0) != len(level0_boxes):
        raise ValueError(f"{len(glimpse_trails_level0)} glimpse trails for {len(level0_boxes)} tiles")
    if tile_labels is not None and len(tile_labels) != len(level0_boxes):
        raise ValueError(f"{len(tile_labels)} tile labels for {len(level0_boxes)} tiles")

    height, width = thumbnail_rgb.shape[:2]
    panel_w = 5.0
    panel_h = max(2.0, min(8.0, panel_w * height / max(width, 1)))
    n_panels = 2 if has_attention else 1
    figure = Figure(figsize=(panel_w * n_panels, panel_h + (0.5 if title else 0.0)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_panels, squeeze=False)[0]

    axes[0].imshow(thumbnail_rgb)
    axes[0].set_title("tiles and glimpse trails", fontsize=9)
    if has_attention:
        axes[1].imshow(thumbnail_rgb, alpha=0.35)
        heat = axes[1].imshow(np.asarray(attention_map, dtype=np.float64), cmap="magma", alpha=0.75)
        colorbar = figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
        # A near-uniform map would otherwise be labelled as "offset + tiny deltas", which nobody can read.
        colorbar.formatter.set_useOffset(False)
        colorbar.formatter.set_powerlimits((-3, 3))
        colorbar.update_ticks()
        axes[1].set_title("soft attention", fontsize=9)

    for i, box in enumerate(level0_boxes):
        colour = _TILE_COLOURS[i % len(_TILE_COLOURS)]
        col0, row0, box_w, box_h = _box_corners_thumb(box, downsample)
        for ax in axes:
            ax.add_patch(Rectangle((col0, row0), box_w, box_h, fill=False, edgecolor=colour, linewidth=1.2))
        label = f"{i + 1}" + (f": {tile_labels[i]}" if tile_labels is not None else "")
        axes[0].text(col0, row0 - 1, label, color=colour, fontsize=7, va="bottom", ha="left")
        if glimpse_trails_level0 is not None and len(glimpse_trails_level0[i]):
            rc = np.array([level0_to_thumb_rc(x, y, downsample) for x, y in glimpse_trails_level0[i]])
            axes[0].plot(rc[:, 1], rc[:, 0], "-", color=colour, linewidth=0.8)
            axes[0].plot(rc[0, 1], rc[0, 0], "o", color=colour, markersize=3)
            axes[0].plot(rc[-1, 1], rc[-1, 0], "x", color=colour, markersize=4)

    for ax in axes:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def slide_score_figure(thumbnail_rgb: np.ndarray, slide_score: Any, downsample: int, title: str | None = None,
                       class_names: Sequence[str] | None = None) -> Figure:
    """``overlay_figure`` for a ``dual_attention.pipeline.SlideScore``: its tiles, each labelled with its
    predicted class (name when ``class_names`` is given) and that class's probability, their glimpse
    trails and the attention map."""
    tiles = list(slide_score.tiles)
    labels = []
    for tile in tiles:
        name = class_names[tile.predicted_class] if class_names is not None else str(tile.predicted_class)
        labels.append(f"{name} ({tile.class_probabilities[tile.predicted_class]:.2f})")
    return overlay_figure(
        thumbnail_rgb,
        slide_score.attention_map,
        [t.level0_box for t in tiles],
        downsample,
        glimpse_trails_level0=[t.glimpse_trail_level0 for t in tiles],
        tile_labels=labels,
        title=title,
    )


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def save_slide_score_overlay(path: str | Path, thumbnail_rgb: np.ndarray, slide_score: Any, downsample: int,
                             title: str | None = None, class_names: Sequence[str] | None = None) -> Path:
    """Render and write the overlay PNG of one scored slide; returns the path."""
    figure = slide_score_figure(thumbnail_rgb, slide_score, downsample, title=title, class_names=class_names)
    return save_figure(figure, path)


def overlay_png_bytes(thumbnail_rgb: np.ndarray, slide_score: Any, downsample: int, title: str | None = None,
                      class_names: Sequence[str] | None = None) -> bytes:
    """The overlay PNG as bytes (for an HTTP answer)."""
    buffer = io.BytesIO()
    slide_score_figure(thumbnail_rgb, slide_score, downsample, title=title, class_names=class_names).savefig(
        buffer, format="png")
    return buffer.getvalue()
