"""Longer learning runs of the two attention stages, with before/after figures, plus the cost of one
training step. Prints markdown tables (paste into benchmarks/RESULTS.md, section "Model core").

    .venv/bin/python benchmarks/bench_learning.py                  # defaults below, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_learning.py --seeds 0 1 --agent-steps 100 --sam-steps 80   # quick

1. Agent alone, label visible only in the top-left 24 px of a 64 px tile (dual_attention.synthetic.toy_tasks):
   accuracy and share of tiles with a glimpse on the label, before/after, per seed; figure of the glimpse
   locations before/after.
2. SAM alone through pipeline.training_step (separate mode, SAM phase), toy slides whose label shows
   only inside a tumour: attention mass on tumour / on tissue, before/after, per seed and per β;
   figure of attention maps before/after with the tumour outlined.
3. One joint training_step of the cpu-small preset on 4 slides x 4 tiles of 256² (CPU seconds).
4. (``--cohort``) The SAM on the synthetic MMR cohort (dual_attention.synthetic, OpenSlide reads), where
   the label is nuclear DAB in tumour cells only: attention on tumour / tissue on held-out slides,
   before/after, against the tumour's area share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dual_attention.config import preset  # noqa: E402
from dual_attention.models import DualAttentionModel  # noqa: E402
from dual_attention.pipeline import attention_map_of  # noqa: E402
from dual_attention.synthetic.toy_tasks import (  # noqa: E402
    AGENT_TILE_PX,
    LABEL_REGION_PX,
    glimpses_in_label_region,
    region_label_tiles,
    sam_toy_config,
    train_agent_on_region_task,
    train_sam_on_toy_slides,
)
from dual_attention.training import SlideBatch, training_step  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"
GLASS_GREY = 238  # synthetic cohort thumbnails: glass reads ~242 grey, tissue darker


def _shown(attention: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """What the sampler sees: attention min-max normalised over tissue; off tissue masked out."""
    from dual_attention.sampling import normalise_attention

    floor = attention[tissue].min()
    return np.ma.masked_where(~tissue, normalise_attention(np.where(tissue, attention, floor)))


def bench_agent(seeds: list[int], steps: int) -> list[str]:
    rows = ["| seed | steps | accuracy before | accuracy after | tiles with a glimpse on the label, before | after |",
            "|---|---|---|---|---|---|"]
    for seed in seeds:
        t0 = time.perf_counter()
        before, after, history = train_agent_on_region_task(steps=steps, seed=seed, progress=True)
        seen = [glimpses_in_label_region(e.locations_xy, 8).any(axis=1).mean() for e in (before, after)]
        rows.append(f"| {seed} | {steps} | {before.accuracy:.2f} | {after.accuracy:.2f} | {seen[0]:.2f} | "
                    f"{seen[1]:.2f} |")
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if seed == seeds[0]:
            _agent_figure(before, after, history, steps)
    return rows


def _agent_figure(before, after, history, steps: int) -> None:
    tiles, _ = region_label_tiles(1, np.random.default_rng(123))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, evaluation, title in ((axes[0], before, "before"), (axes[1], after, f"after {steps} steps")):
        ax.imshow(tiles[0], extent=(-1, 1, 1, -1), alpha=0.35)
        ax.add_patch(plt.Rectangle((-1, -1), 2 * LABEL_REGION_PX / AGENT_TILE_PX, 2 * LABEL_REGION_PX / AGENT_TILE_PX,
                                   fill=False, edgecolor="red", linewidth=2, label="label region"))
        for t in range(evaluation.locations_xy.shape[1]):
            xy = evaluation.locations_xy[:, t] + np.random.default_rng(t).normal(0, 0.02, evaluation.locations_xy[:, t].shape)
            ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.5, label=f"glimpse {t + 1}")
        ax.set(xlim=(-1.05, 1.05), ylim=(1.05, -1.05), title=f"{title}: accuracy {evaluation.accuracy:.2f}",
               xlabel="x (tile, [-1, 1])", ylabel="y")
        ax.legend(fontsize=7, loc="lower right")
    accuracy = np.convolve([h["accuracy"] for h in history], np.ones(10) / 10, mode="valid")
    axes[2].plot(accuracy)
    axes[2].set(title="training accuracy (last step, 10-step mean)", xlabel="step", ylim=(0, 1.05))
    fig.suptitle("Hard-attention agent: label visible only in the top-left corner (glimpse centres, jittered)")
    fig.tight_layout()
    fig.savefig(FIGURES / "agent_glimpses_before_after.png", dpi=110)
    plt.close(fig)


def bench_sam(seeds: list[int], steps: int, betas: list[float]) -> list[str]:
    rows = ["| β | seed | steps | attention mass on tumour / tissue, before → after | pixel AUROC tumour vs "
            "tissue, before → after | sampler hits on tumour, before → after | SAM head accuracy, last 10 steps |",
            "|---|---|---|---|---|---|---|"]
    for beta in betas:
        for seed in seeds:
            t0 = time.perf_counter()
            before, after, history, model, slides = train_sam_on_toy_slides(steps=steps, seed=seed, beta=beta,
                                                                             progress=True)
            accuracy = np.mean([h["sam_accuracy"] for h in history[-10:]])
            rows.append(f"| {beta:g} | {seed} | {steps} | {before.mass_share:.3f} → {after.mass_share:.3f} | "
                        f"{before.pixel_auroc:.2f} → {after.pixel_auroc:.2f} | {before.sampler_hit_rate:.2f} → "
                        f"{after.sampler_hit_rate:.2f} | {accuracy:.2f} |")
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if seed == seeds[0] and beta == betas[0]:
                _sam_figure(model, slides, seed, beta, steps)
    return rows


def _sam_figure(model, slides, seed: int, beta: float, steps: int) -> None:
    torch.manual_seed(seed)
    fresh = DualAttentionModel(sam_toy_config())  # the same initial weights as the trained model
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for column, slide in enumerate(slides[:4]):
        with torch.no_grad():
            maps = [attention_map_of(m, slide.thumbnail, slide.tissue_mask).numpy() for m in (fresh, model)]
        axes[0, column].imshow(slide.thumbnail)
        axes[0, column].set_title(f"thumbnail, label {slide.label}")
        for row, (attention, title) in enumerate(zip(maps, ("before", f"after {steps} steps"), strict=True), 1):
            axes[row, column].imshow(_shown(attention, slide.tissue_mask), cmap="magma", vmin=0, vmax=1)
            axes[row, column].contour(slide.tumour_mask, levels=[0.5], colors="cyan", linewidths=1)
            share = attention[slide.tumour_mask].sum() / attention[slide.tissue_mask].sum()
            axes[row, column].set_title(f"{title}: {share:.2f} on tumour")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Soft attention (β={beta:g}, seed {seed}), min-max normalised over tissue as the sampler sees "
                 "it; titles: attention mass on tumour; tumour outlined in cyan")
    fig.tight_layout()
    fig.savefig(FIGURES / "sam_attention_before_after.png", dpi=110)
    plt.close(fig)


def bench_step_time(repeats: int) -> list[str]:
    config = preset("cpu-small")
    torch.manual_seed(0)
    model = DualAttentionModel(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    slides = []
    for i in range(4):
        level0 = rng.integers(0, 255, size=(1024, 1536, 3), dtype=np.uint8)
        thumb = level0.reshape(32, 32, 48, 32, 3).mean((1, 3)).astype(np.uint8)
        slides.append((level0, thumb, i))
    batch = SlideBatch([s[1] for s in slides], [np.ones(s[1].shape[:2], bool) for s in slides],
                       [s[2] for s in slides], [(1536, 1024)] * 4,
                       [lambda boxes, a=s[0]: np.stack([a[b.y0:b.y0 + 256, b.x0:b.x0 + 256] for b in boxes])
                        for s in slides])
    times, cpu_times = [], []
    for _ in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, terms = training_step(model, batch, 0, config, rng)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    times, cpu_times = times[1:], cpu_times[1:]  # the first step pays one-off costs
    load = os.getloadavg()[0]
    return ["| step | tiles | torch threads | wall median s | wall min s | wall max s | CPU median s | load avg |",
            "|---|---|---|---|---|---|---|---|",
            f"| cpu-small joint training_step + backward + Adam | {int(terms['n_tiles'])} | {torch.get_num_threads()} | "
            f"{statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | {statistics.median(cpu_times):.3f} | "
            f"{load:.0f} |"]


def bench_cohort_sam(steps: int, n_slides: int, slide_px: int, beta: float, seed: int, workdir: Path) -> list[str]:
    from PIL import Image
    from skimage.morphology import remove_small_objects

    from dual_attention.manifest import read_manifest
    from dual_attention.slides import open_slide, tissue_mask
    from dual_attention.synthetic import write_cohort

    manifest = workdir / "manifest.parquet"
    if not manifest.is_file():
        t0 = time.perf_counter()
        manifest = write_cohort(workdir, "mmr", n_slides, seed, slide_level0_px=slide_px, n_folds=4, progress=True)
        print(f"wrote {n_slides} slides of {slide_px}² in {time.perf_counter() - t0:.0f} s", flush=True)
    config = preset("cpu-small", task="mmr").with_overrides(
        {"train.mode": "separate", "train.epochs": 2, "loss.beta": beta})
    downsample = config.slide.thumbnail_downsample
    slides = []
    for row in read_manifest(manifest).to_pylist():
        slide = open_slide(row["path"])
        thumbnail = slide.thumbnail(downsample)
        # slides.tissue_mask keeps little more than the tumour on this cohort (its pale stroma reads as
        # glass), which would leave the SAM nothing to choose; take every pixel darker than the glass.
        product_tissue = tissue_mask(thumbnail, config.slide.tissue_min_area_thumb_px)
        tissue = remove_small_objects(thumbnail.mean(axis=2) < GLASS_GREY, max_size=3) | product_tissue
        tumour = np.asarray(Image.open(row["tumour_mask_path"])) > 0
        tumour = tumour[: thumbnail.shape[0], : thumbnail.shape[1]] & tissue
        slides.append({"slide": slide, "thumbnail": thumbnail, "tissue": tissue, "tumour": tumour,
                       "label": int(row["label"]), "fold": int(row["fold"]),
                       "read": lambda boxes, s=slide: np.stack([s.read_box(b) for b in boxes])})
    train = [s for s in slides if s["fold"] != 0]
    held_out = [s for s in slides if s["fold"] == 0]
    torch.manual_seed(seed)
    model = DualAttentionModel(config)

    def tumour_share(model) -> tuple[float, float, float]:
        """(attention mass on tumour, pixel AUROC tumour vs other tissue, sampler hits on tumour)."""
        from sklearn.metrics import roc_auc_score

        from dual_attention.pipeline import propose_tiles

        shares, aurocs, hits = [], [], []
        with torch.no_grad():
            for s in held_out:
                attention = attention_map_of(model, s["thumbnail"], s["tissue"]).numpy()
                shares.append(attention[s["tumour"]].sum() / attention[s["tissue"]].sum())
                values = attention[s["tissue"]]
                aurocs.append(roc_auc_score(s["tumour"][s["tissue"]], values) if np.ptp(values) > 0 else 0.5)
                proposal = propose_tiles(model, s["thumbnail"], s["tissue"], s["slide"].dimensions, config, seed=0)
                hits.extend(s["tumour"][proposal.centers_thumb_rc[:, 0], proposal.centers_thumb_rc[:, 1]].tolist())
        return float(np.mean(shares)), float(np.mean(aurocs)), float(np.mean(hits))

    area_share = float(np.mean([s["tumour"].sum() / s["tissue"].sum() for s in held_out]))
    before = tumour_share(model)
    initial_maps = [attention_map_of(model, s["thumbnail"], s["tissue"]).detach().numpy() for s in held_out[:4]]
    optimiser = torch.optim.Adam(model.sam_parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    by_label = {label: [s for s in train if s["label"] == label] for label in (0, 1)}
    history = []
    from tqdm import tqdm

    for _ in tqdm(range(steps), desc="SAM on synthetic MMR cohort"):
        members = [by_label[label][i] for label in (0, 1)
                   for i in rng.choice(len(by_label[label]), size=2, replace=False)]
        batch = SlideBatch([s["thumbnail"] for s in members], [s["tissue"] for s in members],
                           [s["label"] for s in members], [s["slide"].dimensions for s in members],
                           [s["read"] for s in members])
        loss, terms = training_step(model, batch, 0, config, rng)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(terms)
    after = tumour_share(model)
    accuracy = np.mean([h["sam_accuracy"] for h in history[-20:]])
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for column, (s, initial) in enumerate(zip(held_out[:4], initial_maps, strict=True)):
        with torch.no_grad():
            final = attention_map_of(model, s["thumbnail"], s["tissue"]).numpy()
        axes[0, column].imshow(s["thumbnail"])
        axes[0, column].set_title(f"held-out, label {config.class_names[s['label']]}")
        for row, (attention, title) in enumerate(((initial, "before"), (final, f"after {steps} steps")), 1):
            axes[row, column].imshow(_shown(attention, s["tissue"]), cmap="magma", vmin=0, vmax=1)
            axes[row, column].contour(s["tumour"], levels=[0.5], colors="cyan", linewidths=0.8)
            share = attention[s["tumour"]].sum() / attention[s["tissue"]].sum()
            axes[row, column].set_title(f"{title}: {share:.2f} on tumour")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"SAM on the synthetic MMR cohort ({slide_px}² slides, β={beta:g}), min-max normalised over tissue; "
                 "titles: attention mass on tumour; tumour outlined in cyan")
    fig.tight_layout()
    fig.savefig(FIGURES / "sam_cohort_before_after.png", dpi=110)
    plt.close(fig)
    for s in slides:
        s["slide"].close()
    return ["| slides (train / held out) | slide px | β | steps | tumour share of tissue area | attention mass on "
            "tumour, before → after | pixel AUROC, before → after | sampler hits on tumour, before → after | "
            "SAM head accuracy, last 20 steps |", "|---|---|---|---|---|---|---|---|---|",
            f"| {len(train)} / {len(held_out)} | {slide_px} | {beta:g} | {steps} | {area_share:.3f} | "
            f"{before[0]:.3f} → {after[0]:.3f} | {before[1]:.2f} → {after[1]:.2f} | {before[2]:.2f} → {after[2]:.2f} | "
            f"{accuracy:.2f} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--agent-steps", type=int, default=200)
    parser.add_argument("--sam-steps", type=int, default=150)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 1.0])
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["agent", "sam", "step"])
    parser.add_argument("--cohort", action="store_true", help="also train the SAM on a synthetic MMR cohort")
    parser.add_argument("--cohort-dir", type=Path, default=Path("/tmp/bench_learning_cohort"))
    parser.add_argument("--cohort-slides", type=int, default=24)
    parser.add_argument("--cohort-slide-px", type=int, default=2048)
    parser.add_argument("--cohort-steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    FIGURES.mkdir(parents=True, exist_ok=True)
    sections = []
    if "step" not in args.skip:
        sections.append(("One training step", bench_step_time(args.step_repeats)))
        print("\n".join(sections[-1][1]), flush=True)
    if "agent" not in args.skip:
        sections.append(("Agent: label only in the top-left corner", bench_agent(args.seeds, args.agent_steps)))
    if "sam" not in args.skip:
        sections.append(("SAM: label only inside the tumour", bench_sam(args.seeds, args.sam_steps, args.betas)))
    if args.cohort:
        sections.append(("SAM on the synthetic MMR cohort", bench_cohort_sam(
            args.cohort_steps, args.cohort_slides, args.cohort_slide_px, args.betas[0], args.seeds[0], args.cohort_dir)))
        print("\n".join(sections[-1][1]), flush=True)
    print()
    for title, rows in sections:
        print(f"#### {title}\n")
        print("\n".join(rows) + "\n")
    print(f"figures: {FIGURES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
