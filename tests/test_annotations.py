"""The GeoJSON of a scored slide (``dual_attention.annotations``): loaded back with geojson and shapely, its
tiles are the scored tiles' level-0 boxes, its glimpses lie in their tiles, its tissue outline covers the
tiles, and every geometry is valid; the same from ``dual-attention score --geojson`` (with ``--overlay``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geojson
import numpy as np
import pytest
import shapely
import torch
from PIL import Image
from shapely.geometry import Point, shape

from dual_attention.annotations import (
    ATTENTION_LEVELS,
    dumps,
    mask_outline_thumb,
    region_features,
    slide_score_geojson,
)
from dual_attention.checkpoint import save_checkpoint
from dual_attention.config import CLASS_NAMES, preset
from dual_attention.models import DualAttentionModel
from dual_attention.overlays import INSET_PX
from dual_attention.pipeline import TileScore, aggregate, location_to_level0
from dual_attention.slides import Level0Box, thumb_rc_to_level0_xy

DOWNSAMPLE = 32
TILE_PX = 512
GLIMPSE_PX = 64


def _load(text: str) -> dict[str, Any]:
    collection = geojson.loads(text)
    assert collection.is_valid, collection.errors()
    return json.loads(text)


def _features(collection: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in collection["features"] if f["properties"]["kind"] == kind]


def test_mask_outline_keeps_holes_and_islands_and_every_pixel_centre() -> None:
    mask = np.zeros((24, 30), dtype=bool)
    mask[2:20, 2:25] = True
    mask[6:14, 6:16] = False  # a hole ...
    mask[8:11, 9:12] = True  # ... with an island in it
    mask[21:23, 27:29] = True  # a separate speck of 4 px
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: 8-connected pixels, kept as pixels
    outline = mask_outline_thumb(mask, min_area_thumb_px=0)
    assert outline.is_valid
    rows, cols = np.indices(mask.shape)
    inside = shapely.contains_xy(outline, cols.ravel(), rows.ravel()).reshape(mask.shape)
    np.testing.assert_array_equal(inside, mask)
    assert sum(len(p.interiors) for p in outline.geoms) == 1  # the hole; the island is its own polygon
    assert mask_outline_thumb(mask, min_area_thumb_px=5.0).area > 0
    assert not any(p.area < 5.0 for p in mask_outline_thumb(mask, min_area_thumb_px=5.0).geoms)
    assert mask_outline_thumb(np.zeros((5, 5), dtype=bool)).is_empty


def _scored_slide(seed: int = 0) -> tuple[Any, np.ndarray, tuple[int, int]]:
    """A slide score as the pipeline makes it: tiles centred on tissue pixels, glimpse trails from
    locations within the policy's limit, an attention map over the tissue."""
    rng = np.random.default_rng(seed)
    rows, cols = 60, 90
    yy, xx = np.mgrid[0:rows, 0:cols]
    tissue = ((yy - 30) / 24.0) ** 2 + ((xx - 40) / 34.0) ** 2 < 1.0
    tissue[25:33, 35:45] = False  # a hole in the tissue
    attention = np.where(tissue, np.exp(-((yy - 20) ** 2 + (xx - 55) ** 2) / 80.0) + 1e-3, 0.0)
    attention /= attention.sum()
    dims = (cols * DOWNSAMPLE, rows * DOWNSAMPLE)
    limit = 1.0 - GLIMPSE_PX / TILE_PX
    tiles = []
    for r, c in [(20, 55), (40, 20), (12, 30), (45, 60)]:
        assert tissue[r, c]
        x, y = thumb_rc_to_level0_xy(r, c, DOWNSAMPLE)
        box = Level0Box(int(x - TILE_PX / 2), int(y - TILE_PX / 2), TILE_PX, TILE_PX)
        locations = rng.uniform(-limit, limit, size=(5, 2))
        locations[0] = (limit, -limit)  # a glimpse at the tile's corner, as far as the policy goes
        probabilities = rng.dirichlet(np.ones(4))
        tiles.append(TileScore(level0_box=box, attention_weight=float(attention[r, c]),
                               predicted_class=int(np.argmax(probabilities)),
                               class_probabilities=[float(p) for p in probabilities],
                               glimpse_trail_level0=[location_to_level0(loc, box) for loc in locations]))
    return aggregate(tiles, "her2", dims, attention_map=attention), tissue, dims


def test_slide_geojson_tiles_glimpses_tissue_and_attention() -> None:
    score, tissue, dims = _scored_slide()
    names = CLASS_NAMES["her2"]
    collection = _load(dumps(slide_score_geojson(score, tissue, names, DOWNSAMPLE, dims, GLIMPSE_PX, slide="s1")))
    assert collection["properties"]["predicted_label"] == score.predicted_label
    assert collection["properties"]["coordinates"] == "level-0 pixels"
    for feature in collection["features"]:
        assert shape(feature["geometry"]).is_valid, feature["properties"]["name"]
        assert feature["properties"]["objectType"] in ("annotation", "detection")

    tile_features = _features(collection, "tile")
    assert len(tile_features) == len(score.tiles)
    tissue_level0 = shape(_features(collection, "tissue")[0]["geometry"])
    for number, (feature, tile) in enumerate(zip(tile_features, score.tiles, strict=True), start=1):
        box = tile.level0_box
        polygon = shape(feature["geometry"])
        assert polygon.bounds == (box.x0, box.y0, box.x0 + box.width, box.y0 + box.height)
        assert polygon.area == box.width * box.height
        properties = feature["properties"]
        assert properties["classification"]["name"] == names[tile.predicted_class]
        assert len(properties["classification"]["color"]) == 3
        assert properties["measurements"]["probability"] == pytest.approx(max(tile.class_probabilities))
        assert properties["tile_number"] == number
        # The tile was centred on a tissue pixel: the outline holds its centre.
        assert tissue_level0.contains(polygon.centroid)
        glimpses = [f for f in _features(collection, "glimpse") if f["properties"]["tile_number"] == number]
        assert len(glimpses) == len(tile.glimpse_trail_level0)
        for glimpse, (x, y) in zip(glimpses, tile.glimpse_trail_level0, strict=True):
            glimpse_box = shape(glimpse["geometry"])
            assert polygon.covers(glimpse_box)
            assert glimpse_box.area == pytest.approx(GLIMPSE_PX**2)
            assert glimpse_box.centroid.distance(Point(x, y)) < 1e-6  # clamping only absorbs rounding
        trail = [f for f in _features(collection, "glimpse_trail") if f["properties"]["tile_number"] == number]
        assert shape(trail[0]["geometry"]).coords[:] == [tuple(p) for p in tile.glimpse_trail_level0]

    # Tissue: the mask's area to within the outline's corner cuts, in level-0 px; the hole stays a hole.
    assert tissue_level0.area == pytest.approx(tissue.sum() * DOWNSAMPLE**2, rel=0.03)
    assert not tissue_level0.contains(Point(*thumb_rc_to_level0_xy(29, 40, DOWNSAMPLE)))
    # Attention: one region per level, each inside the one below and inside the tissue; the peak in all.
    regions = [shape(f["geometry"]) for f in _features(collection, "attention")]
    assert [f["properties"]["attention_level"] for f in _features(collection, "attention")] == list(ATTENTION_LEVELS)
    peak = Point(*thumb_rc_to_level0_xy(20, 55, DOWNSAMPLE))
    for lower, higher in zip(regions, regions[1:], strict=False):
        assert lower.buffer(1e-6).covers(higher) and higher.area < lower.area
    assert all(r.contains(peak) and tissue_level0.buffer(DOWNSAMPLE).covers(r) for r in regions)


def test_flat_or_missing_attention_gives_only_the_tissue() -> None:
    score, tissue, dims = _scored_slide()
    flat = np.where(tissue, 1.0 / tissue.sum(), 0.0)
    assert [f["properties"]["kind"] for f in region_features(tissue, flat, DOWNSAMPLE, dims)] == ["tissue"]
    assert [f["properties"]["kind"] for f in region_features(tissue, None, DOWNSAMPLE, dims)] == ["tissue"]
    assert region_features(np.zeros_like(tissue), flat, DOWNSAMPLE, dims) == []  # no tissue: no empty features
    with pytest.raises(ValueError, match="attention_map shape"):
        region_features(tissue, np.zeros((3, 3)), DOWNSAMPLE, dims)


def test_score_cli_writes_the_geojson(tmp_path: Path, shared_slides: Path) -> None:
    from jobs.score import main

    config = preset("cpu-small")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", DualAttentionModel(config), config)
    out, geojson_path = tmp_path / "score.json", tmp_path / "annotations" / "slide.geojson"
    slide = shared_slides / "aperio" / "CMU-1-Small-Region.svs"
    overlay = tmp_path / "overlay.png"
    assert main(["--model", str(checkpoint.parent), "--slide", str(slide), "--out", str(out),
                 "--geojson", str(geojson_path), "--overlay", str(overlay)]) == 0
    result = json.loads(out.read_text())
    assert result["geojson"] == str(geojson_path.resolve())
    # The overlay beside it: low-power panels over one row of insets (one per tile) at least INSET_PX wide.
    with Image.open(overlay) as picture:
        assert picture.width >= min(len(result["tiles"]), 4) * INSET_PX and picture.height > 2 * INSET_PX
    collection = _load(geojson_path.read_text())
    assert collection["properties"]["predicted_label"] == result["predicted_label"]
    width, height = result["level0_dimensions"]
    tiles = _features(collection, "tile")
    assert [shape(f["geometry"]).bounds for f in tiles] == [
        (t["level0_box"]["x0"], t["level0_box"]["y0"], t["level0_box"]["x0"] + t["level0_box"]["width"],
         t["level0_box"]["y0"] + t["level0_box"]["height"]) for t in result["tiles"]]
    tissue = shape(_features(collection, "tissue")[0]["geometry"])
    assert tissue.is_valid and shapely.box(0, 0, width, height).covers(tissue)
    for feature in tiles:
        assert tissue.intersects(shape(feature["geometry"]))
        number = feature["properties"]["tile_number"]
        glimpses = [shape(f["geometry"]) for f in _features(collection, "glimpse")
                    if f["properties"]["tile_number"] == number]
        assert len(glimpses) == config.agent.n_glimpses
        assert all(shape(feature["geometry"]).covers(g) for g in glimpses)
