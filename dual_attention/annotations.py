"""A scored slide as a GeoJSON FeatureCollection that QuPath imports, in level-0 pixel coordinates.

What a pathologist gets (QuPath: File > Import objects, or drag the file onto the open slide):

- ``tissue``: the tissue mask's outline (annotation, classification "Tissue");
- ``attention``: the soft attention's regions at a few levels of the min-max normalised map over the
  tissue (annotations named e.g. "attention >= 50%"; nested: each lies inside the lower level's);
- ``tile``: each sampled tile as its level-0 box (annotation, classification = the tile's predicted class,
  measurements = class probabilities and attention weight);
- ``glimpse``: each glimpse of the agent as the box of its finest scale (``agent.glimpse_px`` level-0 px,
  which the policy keeps inside the tile; detection, a child of its tile in QuPath's hierarchy), and the
  tile's glimpse trail (a line, in glimpse order).

Every feature's ``properties`` carries QuPath's ``objectType``, ``name``, ``classification`` ({name,
color}) and numeric ``measurements``, plus ``kind`` (one of the four above) for other readers. Thumbnail-
frame outlines are mapped to level 0 by ``slides.thumb_rc_to_level0_xy`` (the one centre mapping).

Outlines come from the mask's marching-squares contours at 0.5 (``skimage.measure.find_contours``), so a
mask pixel's centre lies inside its outline; rings are nested into polygons with holes by their depth
(even: a shell, odd: a hole), simplified by half a thumbnail pixel and made valid with shapely.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import LineString, MultiPolygon, Polygon, box, mapping
from skimage.measure import block_reduce, find_contours

from dual_attention.pipeline import SlideScore, TileScore
from dual_attention.slides import Level0Box, thumb_rc_to_level0_xy

ATTENTION_LEVELS: tuple[float, ...] = (0.25, 0.5, 0.75)  # of the min-max normalised attention over tissue
# The attention regions are outlined on the map averaged over blocks, so that its long side is at most this
# (thumbnail pixels are 1/32 of level 0; a 2048-px tile spans 64): pixel-level outlines of a noisy map made
# hundreds of kB per level and seconds of work on a 40x slide, detail nobody reads at that scale.
ATTENTION_OUTLINE_MAX_PX = 512
TISSUE_RGB = (60, 160, 60)
GLIMPSE_RGB = (0, 200, 255)
# Class colours from the lowest (blue) to the highest score (red); a 2-class task takes the two ends.
_CLASS_RGB = ((33, 102, 172), (240, 200, 40), (244, 109, 67), (178, 24, 43))
_ATTENTION_RGB = ((252, 200, 120), (240, 110, 60), (180, 30, 90))  # pale -> dark with the level


def class_colour_rgb(class_index: int, n_classes: int) -> tuple[int, int, int]:
    """The display colour of class ``class_index`` of ``n_classes`` (GeoJSON and overlay PNG alike)."""
    if n_classes <= 1:
        return _CLASS_RGB[-1]
    position = round(class_index * (len(_CLASS_RGB) - 1) / (n_classes - 1))
    return _CLASS_RGB[min(max(position, 0), len(_CLASS_RGB) - 1)]


# -- geometry -------------------------------------------------------------------------------------------------


def mask_outline_thumb(mask: np.ndarray, min_area_thumb_px: float = 4.0) -> MultiPolygon:
    """The True pixels of ``mask`` (rows, cols) as polygons in the thumbnail frame, x = col, y = row (pixel
    centres at whole numbers); pieces under ``min_area_thumb_px`` are left out."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (rows, cols), got shape {mask.shape}")
    if not mask.any():
        return MultiPolygon()
    # Padding closes every contour at the image border; the padded frame is shifted back by one pixel.
    contours = [c for c in find_contours(np.pad(mask, 1).astype(np.float32), 0.5) if len(c) >= 4]
    if not contours:
        return MultiPolygon()
    # Whole arrays of rings at a time (shapely's vectorised functions): one Python call per ring was most of
    # a cohort job's per-slide GeoJSON cost (about 7 ms a slide on 2048² slides, measured).
    coords = np.concatenate(contours)[:, ::-1] - 1.0
    lengths = [len(c) for c in contours]
    starts = np.cumsum([0, *lengths[:-1]])
    rings = shapely.linearrings(coords, indices=np.repeat(np.arange(len(contours)), lengths))
    filled = shapely.polygons(rings)
    keep = shapely.area(filled) > 0
    if not keep.any():
        return MultiPolygon()
    rings, filled, first_vertices = rings[keep], filled[keep], shapely.points(coords[starts[keep]])
    # Depth = how many rings enclose a ring (rings never cross, so one vertex of it decides).
    tree = shapely.STRtree(filled)
    enclosing: list[list[int]] = [[] for _ in rings]
    for vertex_index, ring_index in zip(*tree.query(first_vertices, predicate="within"), strict=True):
        if vertex_index != ring_index:
            enclosing[int(vertex_index)].append(int(ring_index))
    depth = [len(e) for e in enclosing]
    holes: dict[int, list[int]] = {i: [] for i, d in enumerate(depth) if d % 2 == 0}
    for i, d in enumerate(depth):
        if d % 2 == 1:  # a hole: its shell is the deepest ring around it
            holes[max(enclosing[i], key=lambda j: depth[j])].append(i)
    # Each shell followed by its holes, one polygon per shell.
    order = [ring for shell in sorted(holes) for ring in (shell, *holes[shell])]
    polygon_of_ring = [n for n, shell in enumerate(sorted(holes)) for _ in range(1 + len(holes[shell]))]
    polygons = shapely.polygons(rings[order], indices=polygon_of_ring)
    # A quarter pixel: drops most of marching squares' staircase vertices and keeps pixel centres inside
    # (they lie at least 0.35 px from the contour).
    pieces = shapely.get_parts(shapely.make_valid(shapely.simplify(polygons, 0.25, preserve_topology=True)))
    polygon = shapely.get_type_id(pieces) == shapely.GeometryType.POLYGON
    return MultiPolygon(list(pieces[polygon & (shapely.area(pieces) >= min_area_thumb_px)]))


def thumb_geometry_to_level0(geometry: Any, downsample: int) -> Any:
    """A shapely geometry in the thumbnail frame (x = col, y = row) -> level-0 pixel coordinates."""
    def to_level0(xy: np.ndarray) -> np.ndarray:
        x, y = thumb_rc_to_level0_xy(xy[:, 1], xy[:, 0], downsample)
        return np.stack([x, y], axis=1)

    return shapely.transform(geometry, to_level0)


def level0_box_polygon(level0_box: Level0Box) -> Polygon:
    return box(level0_box.x0, level0_box.y0, level0_box.x0 + level0_box.width, level0_box.y0 + level0_box.height)


def glimpse_box_level0(center_xy: tuple[float, float], side_level0_px: float, tile: Level0Box) -> Polygon:
    """The finest-scale glimpse centred on ``center_xy``; the policy keeps it inside the tile, and the
    clamp only absorbs float rounding at the tile's edge."""
    half = side_level0_px / 2.0
    x0 = min(max(center_xy[0] - half, tile.x0), tile.x0 + tile.width - side_level0_px)
    y0 = min(max(center_xy[1] - half, tile.y0), tile.y0 + tile.height - side_level0_px)
    return box(x0, y0, x0 + side_level0_px, y0 + side_level0_px)


# -- features -------------------------------------------------------------------------------------------------


def _feature(geometry: Any, kind: str, object_type: str, name: str, classification: str | None = None,
             colour_rgb: tuple[int, int, int] | None = None, measurements: dict[str, float] | None = None,
             **extra: Any) -> dict[str, Any]:
    properties: dict[str, Any] = {"objectType": object_type, "name": name, "kind": kind, "isLocked": True}
    if classification is not None:
        properties["classification"] = {"name": classification, "color": list(colour_rgb or TISSUE_RGB)}
    elif colour_rgb is not None:
        properties["color"] = list(colour_rgb)
    if measurements:
        properties["measurements"] = {k: float(v) for k, v in measurements.items()}
    properties.update(extra)
    return {"type": "Feature", "geometry": mapping(geometry), "properties": properties}


def region_features(tissue_mask: np.ndarray, attention_map: np.ndarray | None, downsample: int,
                    level0_dims: tuple[int, int], levels: Sequence[float] = ATTENTION_LEVELS,
                    min_area_thumb_px: float = 4.0) -> list[dict[str, Any]]:
    """The tissue outline and the attention regions (``attention >= level`` of the map min-max normalised
    over the tissue) as features in level-0 px, cut to the slide's ``level0_dims`` (width, height: the
    thumbnail's last row and column may reach past them). A flat or missing map gives no attention features."""
    tissue_mask = np.asarray(tissue_mask, dtype=bool)
    slide = box(0, 0, *level0_dims)

    def to_level0(region: Any) -> MultiPolygon:
        cut = shapely.make_valid(thumb_geometry_to_level0(region, downsample).intersection(slide))
        return MultiPolygon([g for g in getattr(cut, "geoms", [cut]) if isinstance(g, Polygon) and g.area > 0])

    features = []
    tissue = mask_outline_thumb(tissue_mask, min_area_thumb_px)
    tissue_level0 = to_level0(tissue)
    if not tissue_level0.is_empty:
        features.append(_feature(tissue_level0, "tissue", "annotation", "tissue", classification="Tissue",
                                 colour_rgb=TISSUE_RGB, measurements={"area_level0_px2": tissue_level0.area}))
    if attention_map is None or np.asarray(attention_map).size == 0:
        return features
    attention_map = np.asarray(attention_map, dtype=np.float64)
    if attention_map.shape != tissue_mask.shape:
        raise ValueError(f"attention_map shape {attention_map.shape} != tissue_mask shape {tissue_mask.shape}")
    values = attention_map[tissue_mask]
    if values.size == 0 or not np.ptp(values) > 0:
        return features
    normalised = np.where(tissue_mask, (attention_map - values.min()) / np.ptp(values), 0.0)
    block = max(1, -(-max(normalised.shape) // ATTENTION_OUTLINE_MAX_PX))
    # The mean over each block's tissue pixels (blocks without tissue: -1, below every level).
    tissue_count = block_reduce(tissue_mask.astype(np.float64), block, np.sum)
    coarse = np.divide(block_reduce(normalised, block, np.sum), tissue_count,
                       out=np.full(tissue_count.shape, -1.0), where=tissue_count > 0)
    for i, level in enumerate(sorted(levels)):
        region = mask_outline_thumb(coarse >= level, min_area_thumb_px / block**2)
        if region.is_empty:
            continue
        # Block (R, C) covers thumbnail rows R*block .. R*block + block - 1: its centre is (block - 1) / 2 on.
        region = to_level0(shapely.affinity.affine_transform(
            region, [block, 0, 0, block, (block - 1) / 2, (block - 1) / 2]))
        if region.is_empty:
            continue
        percent = round(100 * level)
        features.append(_feature(region, "attention", "annotation",
                                 f"attention >= {percent}%", colour_rgb=_ATTENTION_RGB[i % len(_ATTENTION_RGB)],
                                 measurements={"attention_level": float(level)}, attention_level=float(level)))
    return features


def tile_features(tiles: Sequence[TileScore], class_names: Sequence[str], glimpse_level0_px: float
                  ) -> list[dict[str, Any]]:
    """Each tile's box (classified by its predicted class), its glimpse boxes and its glimpse trail."""
    features = []
    for index, tile in enumerate(tiles):
        number = index + 1  # as numbered on the overlay PNG
        name = class_names[tile.predicted_class]
        probability = float(tile.class_probabilities[tile.predicted_class])
        measurements = {"tile_number": number, "probability": probability,
                        "attention_weight": float(tile.attention_weight)}
        measurements |= {f"prob {c}": float(p) for c, p in zip(class_names, tile.class_probabilities, strict=True)}
        colour = class_colour_rgb(tile.predicted_class, len(class_names))
        features.append(_feature(level0_box_polygon(tile.level0_box), "tile", "annotation",
                                 f"tile {number}: {name} ({probability:.2f})", classification=name,
                                 colour_rgb=colour, measurements=measurements, tile_number=number,
                                 predicted_class=int(tile.predicted_class)))
        trail = [(float(x), float(y)) for x, y in tile.glimpse_trail_level0]
        for step, center in enumerate(trail):
            features.append(_feature(glimpse_box_level0(center, glimpse_level0_px, tile.level0_box), "glimpse",
                                     "detection", f"tile {number} glimpse {step + 1}", colour_rgb=GLIMPSE_RGB,
                                     measurements={"tile_number": number, "glimpse_number": step + 1},
                                     tile_number=number, glimpse_number=step + 1))
        if len(trail) >= 2:
            features.append(_feature(LineString(trail), "glimpse_trail", "annotation",
                                     f"tile {number} glimpse trail", colour_rgb=GLIMPSE_RGB, tile_number=number))
    return features


def feature_collection(features: Iterable[dict[str, Any]], properties: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """A FeatureCollection; ``properties`` (the slide's score, model, ...) go in a foreign member, which
    QuPath ignores and other readers may use."""
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": list(features)}
    if properties:
        collection["properties"] = properties
    return collection


def slide_properties(score: SlideScore, class_names: Sequence[str], **extra: Any) -> dict[str, Any]:
    """The slide-level facts a GeoJSON carries: predicted class, probabilities, confidence, fraction read."""
    return {"coordinates": "level-0 pixels", "predicted_label": score.predicted_label,
            "predicted_class": int(score.predicted_class),
            "class_probabilities": dict(zip(class_names, map(float, score.class_probabilities), strict=True)),
            "confidence": float(score.confidence), "fraction_level0_read": float(score.fraction_level0_read),
            **extra}


def slide_score_geojson(score: SlideScore, tissue_mask: np.ndarray, class_names: Sequence[str], downsample: int,
                        level0_dims: tuple[int, int], glimpse_level0_px: float, **properties: Any
                        ) -> dict[str, Any]:
    """The whole FeatureCollection of one scored slide (tissue, attention, tiles, glimpses)."""
    features = region_features(tissue_mask, score.attention_map, downsample, level0_dims)
    features += tile_features(score.tiles, class_names, glimpse_level0_px)
    return feature_collection(features, slide_properties(score, class_names, **properties))


def dumps(collection: dict[str, Any]) -> str:
    """Compact JSON text of a FeatureCollection (coordinates as written; no NaN)."""
    return json.dumps(collection, separators=(",", ":"), allow_nan=False)
