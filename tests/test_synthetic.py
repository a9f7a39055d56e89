"""Synthetic cohort: slides OpenSlide reads (levels, downsamples, mpp, objective), determinism, streaming
equivalence, label-bearing detail at high power, balanced manifests, and the CLI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed

from dual_attention import synthetic
from dual_attention.manifest import read_manifest
from dual_attention.slides import Level0Box, open_slide
from dual_attention.synthetic import (
    CELL_TUMOUR,
    FIELD_PX,
    SyntheticError,
    make_layout,
    plan_cohort,
    render_region,
    write_cohort,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def her2_slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("her2")
    return write_synthetic_slide(folder / "s.tiff", "her2", 3, 42, 1024, 2048, mask_path=folder / "s_mask.png")


def test_slide_opens_in_openslide_with_a_power_of_two_pyramid_and_mpp(her2_slide: dict) -> None:
    osr = openslide.OpenSlide(her2_slide["path"])
    assert osr.level_count == 3
    assert osr.level_dimensions == ((1024, 2048), (512, 1024), (256, 512))
    assert osr.level_downsamples == (1.0, 2.0, 4.0)
    assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25, abs=1e-4)
    assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25, abs=1e-4)
    assert float(osr.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 40
    with open_slide(her2_slide["path"]) as slide:  # and through the project's own reader
        assert slide.info.mpp_source == "file" and slide.info.objective_source == "file"
        assert slide.thumbnail(32).shape == (64, 32, 3)


def test_plain_tiff_reports_mpp_but_no_objective(tmp_path: Path) -> None:
    info = write_synthetic_slide(tmp_path / "p.tiff", "mmr", 0, 5, 1024, 1024, objective_power=None)
    osr = openslide.OpenSlide(info["path"])
    assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert osr.level_count == 2
    assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25, abs=1e-4)
    assert openslide.PROPERTY_NAME_OBJECTIVE_POWER not in osr.properties


def test_reduced_level_is_the_2x_mean_of_level0(her2_slide: dict) -> None:
    osr = openslide.OpenSlide(her2_slide["path"])
    level0 = np.asarray(osr.read_region((256, 512), 0, (512, 512)).convert("RGB"), np.float32)
    level1 = np.asarray(osr.read_region((256, 512), 1, (256, 256)).convert("RGB"), np.float32)
    expected = level0.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1 - expected).mean() < 3.0  # JPEG at both levels; content identical
    assert level0.std() > 10  # not a blank slide


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path: Path) -> None:
    a = write_synthetic_slide(tmp_path / "a.tiff", "her2", 2, 7, 1024, 1024)
    b = write_synthetic_slide(tmp_path / "b.tiff", "her2", 2, 7, 1024, 1024)
    c = write_synthetic_slide(tmp_path / "c.tiff", "her2", 2, 8, 1024, 1024)
    pixels = [np.asarray(openslide.OpenSlide(i["path"]).read_region((0, 0), 0, (1024, 1024))) for i in (a, b, c)]
    assert np.array_equal(pixels[0], pixels[1])
    assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()
    assert not np.array_equal(pixels[0], pixels[2])


def test_region_pixels_do_not_depend_on_how_the_slide_is_cut() -> None:
    """What makes streaming possible: a region rendered whole equals the same region rendered in pieces
    with unaligned edges."""
    layout = make_layout("her2", 1, 3, 2048, 2048)
    whole = render_region(layout, 700, 900, 300, 260)
    top_left = render_region(layout, 700, 900, 137, 101)
    top_right = render_region(layout, 837, 900, 163, 101)
    bottom = render_region(layout, 700, 1001, 300, 159)
    assert np.array_equal(whole, np.concatenate([np.concatenate([top_left, top_right], axis=1), bottom], axis=0))


def test_tumour_mask_is_at_1_32_and_marks_tumour_cells(her2_slide: dict) -> None:
    mask = np.asarray(Image.open(her2_slide["tumour_mask_path"])) > 0
    assert mask.shape == (2048 // FIELD_PX, 1024 // FIELD_PX)
    assert 0.0 < mask.mean() < 0.6 and her2_slide["tumour_fraction"] == pytest.approx(mask.mean())
    # The mask and the rendered cells come from the same fields: cell centres inside mask pixels are tumour.
    layout = make_layout("her2", 3, 42, 1024, 2048)
    cells = synthetic.render._cells(layout, 0, 0, 2048 // 16, 1024 // 16)
    inside = mask.repeat(2, axis=0).repeat(2, axis=1)  # 16-px cells, 32-px mask pixels
    tumour = cells["kind"] == CELL_TUMOUR
    assert tumour[inside].mean() > 0.9 and tumour[~inside].mean() < 0.05


def _tumour_and_stroma_boxes(layout, n: int = 6, side: int = 64) -> tuple[list, list]:
    mask = layout.tumour_mask()
    tissue = layout.tissue_mask()
    eroded_tumour = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    stroma = tissue & ~mask
    stroma = stroma & np.roll(stroma, 1, 0) & np.roll(stroma, -1, 0) & np.roll(stroma, 1, 1) & np.roll(stroma, -1, 1)
    rng = np.random.default_rng(0)
    boxes = []
    for region in (eroded_tumour, stroma):
        rc = np.argwhere(region)
        pick = rc[rng.choice(len(rc), size=n, replace=False)]
        boxes.append([(int((c + 0.5) * FIELD_PX - side / 2), int((r + 0.5) * FIELD_PX - side / 2)) for r, c in pick])
    return boxes[0], boxes[1]


def _dab(layout, boxes, side: int = 64) -> np.ndarray:
    return np.stack([rgb2hed(render_region(layout, x, y, side, side))[..., 2] for x, y in boxes])


def test_her2_membrane_rings_grade_with_the_label_at_high_power() -> None:
    ring_strength = []
    for label in range(4):
        layout = make_layout("her2", label, 100, 2048, 2048)
        tumour_boxes, _ = _tumour_and_stroma_boxes(layout)
        dab = _dab(layout, tumour_boxes)
        # Rings are thin: DAB above a 9-px local mean; cytoplasmic blush is smooth and cancels out.
        residual = dab - ndimage.uniform_filter(dab, size=(1, 9, 9))
        ring_strength.append(float(np.percentile(residual, 95)))
    assert ring_strength == sorted(ring_strength), ring_strength
    assert ring_strength[0] < 0.01 < ring_strength[1]


def test_mmr_tumour_nuclei_brown_when_intact_blue_when_lost_normal_nuclei_brown_in_both() -> None:
    results = {}
    for label in (0, 1):
        layout = make_layout("mmr", label, 200, 2048, 2048)
        tumour_boxes, stroma_boxes = _tumour_and_stroma_boxes(layout)
        tumour_dab, stroma_dab = _dab(layout, tumour_boxes), _dab(layout, stroma_boxes)
        # Nuclei are small: DAB above a 15-px local mean; diffuse cytoplasmic blush cancels out.
        tumour_nuclear = tumour_dab - ndimage.uniform_filter(tumour_dab, size=(1, 15, 15))
        stroma_nuclear = stroma_dab - ndimage.uniform_filter(stroma_dab, size=(1, 15, 15))
        results[label] = (np.percentile(tumour_nuclear, 99), np.percentile(stroma_nuclear, 99.5))
    assert results[0][0] > 0.03 and results[0][0] > 2.5 * results[1][0], results  # intact: brown; loss: not
    assert results[0][1] > 0.02 and results[1][1] > 0.02, results  # internal positive control in both


def test_plan_balances_labels_and_stratifies_folds() -> None:
    plan = plan_cohort("her2", 16, 0, 4)
    labels = Counter(label for _, label, _, _ in plan)
    assert labels == {0: 4, 1: 4, 2: 4, 3: 4}
    for fold in range(4):
        assert sorted(label for _, label, f, _ in plan if f == fold) == [0, 1, 2, 3]
    assert len({s for *_, s in plan}) == 16  # distinct slide seeds
    odd = plan_cohort("mmr", 7, 1, 3)
    assert sorted(Counter(f for _, _, f, _ in odd).values()) == [2, 2, 3]
    assert sorted(Counter(lab for _, lab, _, _ in odd).values()) == [3, 4]
    assert plan_cohort("her2", 16, 0, 4) == plan


def test_write_cohort_manifest_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = synthetic.main(
        ["--out", str(tmp_path / "c"), "--task", "mmr", "--n-slides", "4", "--seed", "3", "--size-level0-px", "512",
         "--folds", "2", "--workers", "1"],
        prog="dual-attention synth",
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "0 (intact)" in printed and "1 (loss)" in printed and "size on disk" in printed
    table = read_manifest(tmp_path / "c" / "manifest.parquet")
    rows = table.to_pylist()
    assert [r["label"] for r in rows].count(0) == 2 and [r["fold"] for r in rows].count(0) == 2
    for row in rows:
        assert Path(row["path"]).is_file() and Path(row["tumour_mask_path"]).is_file()
        assert row["task"] == "mmr" and row["width_level0_px"] == 512
    # The same slide rewritten alone from its manifest seed gives the same pixels.
    again = write_synthetic_slide(tmp_path / "again.tiff", "mmr", rows[0]["label"], rows[0]["seed"], 512, 512)
    with open_slide(again["path"]) as a, open_slide(rows[0]["path"]) as b:
        box = Level0Box(0, 0, 512, 512)
        assert np.array_equal(a.read_box(box), b.read_box(box))


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(SyntheticError, match="task"):
        write_synthetic_slide(tmp_path / "x.tiff", "pdl1", 0, 0, 512, 512)
    with pytest.raises(SyntheticError, match="label for task 'mmr'"):
        write_synthetic_slide(tmp_path / "x.tiff", "mmr", 2, 0, 512, 512)
    with pytest.raises(SyntheticError, match="width_level0_px"):
        write_synthetic_slide(tmp_path / "x.tiff", "mmr", 0, 0, 8, 512)
    with pytest.raises(SyntheticError, match="n_slides"):
        write_cohort(tmp_path, "her2", 0, 0)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--task", "her2", "--n-slides", "0"])
