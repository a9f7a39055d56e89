"""The agent as a tile reader: trained alone on tumour tiles of a synthetic HER2 cohort, slide accuracy on
held-out slides beside a supervised CNN probe on the same glimpses.

    .venv/bin/python benchmarks/bench_agent_gate.py                  # the committed table
    .venv/bin/python benchmarks/bench_agent_gate.py --steps 100      # smoke

A fresh cohort (``--seed``, never used to choose settings) is written; from each slide ``--tiles`` tiles of
the cpu-small size whose tumour fraction (from the cohort's tumour mask) is ≥ 0.9 are read. Folds 1-3 train,
fold 0 tests. The agent (cpu-small, as ``dual_attention.training`` trains it: L_HA, Adam, location std
annealed, random first glimpse) trains ``--steps`` steps of 16 tiles. Slide accuracy: the slide's tiles
aggregated as in scoring (``metrics.aggregate_tile_probabilities``).

The probe answers "how much of the label is in what the agent saw": the glimpses the trained agent takes
(its sensor's crops at its evaluation locations) are cut out of every tile, and a small CNN (the agent's
glimpse CNN layout + a linear head, fresh weights) is trained on them with plain cross-entropy, the
glimpses' logits averaged per tile. Gate: agent ≥ 0.9 slide accuracy and within 5 points of the probe.
Writes benchmarks/results/agent_gate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dual_attention import losses, metrics  # noqa: E402
from dual_attention.config import preset  # noqa: E402
from dual_attention.manifest import read_manifest  # noqa: E402
from dual_attention.models import DualAttentionModel, Standardise, _small_cnn, images_to_tensor  # noqa: E402
from dual_attention.slides import Level0Box, open_slide, read_tumour_mask, tissue_mask  # noqa: E402
from dual_attention.synthetic import write_cohort  # noqa: E402
from dual_attention.training import location_std  # noqa: E402


def tumour_tiles(row: dict, config, n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    side, downsample = config.tile.tile_level0_px, config.slide.thumbnail_downsample
    slide = open_slide(row["path"])
    thumbnail = slide.thumbnail(downsample)
    tissue = tissue_mask(thumbnail, config.slide.tissue_min_area_thumb_px)
    tumour = read_tumour_mask(row["tumour_mask_path"], tissue.shape)
    cover = ndimage.uniform_filter(tumour.astype(float), size=side // downsample)
    candidates = np.argwhere((cover >= 0.9) & tissue)
    picked = candidates[rng.choice(len(candidates), min(n, len(candidates)), replace=False)]
    width, height = slide.dimensions
    tiles = []
    for r, c in picked:
        x0 = int(np.clip(c * downsample + downsample // 2 - side // 2, 0, width - side))
        y0 = int(np.clip(r * downsample + downsample // 2 - side // 2, 0, height - side))
        tiles.append(slide.read_box(Level0Box(x0, y0, side, side)))
    slide.close()
    return np.stack(tiles)


def slide_accuracy(tile_probs: np.ndarray, slide_index: np.ndarray, labels: np.ndarray) -> float:
    correct = []
    for s in np.unique(slide_index):
        predicted, _, _ = metrics.aggregate_tile_probabilities(tile_probs[slide_index == s], "her2")
        correct.append(predicted == labels[slide_index == s][0])
    return float(np.mean(correct))


class GlimpseProbe(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.standardise = Standardise()
        self.cnn = _small_cnn(in_channels, (16, 32, 64))
        self.head = nn.Linear(64 * 16, num_classes)

    def forward(self, glimpses: torch.Tensor) -> torch.Tensor:  # (tiles, T, C, g, g) -> (tiles, classes)
        tiles, steps = glimpses.shape[:2]
        logits = self.head(self.cnn(self.standardise(glimpses.flatten(0, 1))))
        return logits.view(tiles, steps, -1).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=606)
    parser.add_argument("--n-slides", type=int, default=48)
    parser.add_argument("--slide-px", type=int, default=3072)
    parser.add_argument("--tiles", type=int, default=12, help="tumour tiles per slide")
    parser.add_argument("--steps", type=int, default=1000, help="agent updates (cpu-small training gives it 1000)")
    parser.add_argument("--probe-steps", type=int, default=600)
    parser.add_argument("--work-dir", default="/tmp/agent-gate")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "agent_gate.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(args.work_dir) / f"her2-{args.seed}"
    if not (work / "manifest.parquet").is_file():
        write_cohort(work, "her2", args.n_slides, seed=args.seed, slide_level0_px=args.slide_px, n_folds=4,
                     progress=False)
    config = preset("cpu-small")
    rng = np.random.default_rng(args.seed)
    splits: dict[str, list] = {"train": [], "test": []}
    for index, row in enumerate(read_manifest(work / "manifest.parquet").to_pylist()):
        tiles = tumour_tiles(row, config, args.tiles, rng)
        splits["test" if int(row["fold"]) == 0 else "train"].append((tiles, int(row["label"]), index))
    x = {k: np.concatenate([t for t, _, _ in v]) for k, v in splits.items()}
    y = {k: np.concatenate([[label] * len(t) for t, label, _ in v]) for k, v in splits.items()}
    slide_of = {k: np.concatenate([[i] * len(t) for t, _, i in v]) for k, v in splits.items()}

    torch.manual_seed(args.seed)
    agent = DualAttentionModel(config).agent
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.train.lr_agent)
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(args.steps):
        batch = rng.choice(len(x["train"]), 16, replace=False)
        agent.location.std = location_std(config, step)
        out = agent(images_to_tensor(x["train"][batch]), generator=generator)
        terms = losses.agent_losses(out.class_log_probs, out.log_pi, out.baselines, out.means,
                                    torch.as_tensor(y["train"][batch]), config.agent.glimpse_px / config.tile.tile_level0_px,
                                    config.loss.delta)
        optimizer.zero_grad()
        terms.l_ha.backward()
        optimizer.step()
        curve.append(terms.accuracy_last_step)
    agent_s = time.perf_counter() - started

    def agent_eval(tiles: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        with torch.no_grad():
            images = images_to_tensor(tiles)
            first = agent.random_first_locations(len(images), torch.Generator().manual_seed(0))
            out = agent(images, deterministic=True, first_locations=first)
            glimpses = torch.stack([agent.glimpse.sensor(images, out.locations[:, t])
                                    for t in range(out.locations.shape[1])], dim=1)
        return out.class_log_probs[:, -1].exp().numpy(), glimpses

    agent.eval()
    test_probs, test_glimpses = agent_eval(x["test"])
    _, train_glimpses = agent_eval(x["train"])
    agent_tile_acc = float((test_probs.argmax(1) == y["test"]).mean())
    agent_slide_acc = slide_accuracy(test_probs, slide_of["test"], y["test"])

    probe = GlimpseProbe(train_glimpses.shape[2], config.num_classes)
    probe_optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    labels = torch.as_tensor(y["train"])
    for _ in range(args.probe_steps):
        batch = torch.as_tensor(rng.choice(len(labels), 32, replace=False))
        loss = nn.functional.cross_entropy(probe(train_glimpses[batch]), labels[batch])
        probe_optimizer.zero_grad()
        loss.backward()
        probe_optimizer.step()
    with torch.no_grad():
        probe_probs = torch.softmax(probe(test_glimpses), dim=1).numpy()
    probe_tile_acc = float((probe_probs.argmax(1) == y["test"]).mean())
    probe_slide_acc = slide_accuracy(probe_probs, slide_of["test"], y["test"])
    result = {
        "seed": args.seed, "steps": args.steps, "n_train_tiles": len(x["train"]), "n_test_tiles": len(x["test"]),
        "n_test_slides": len(splits["test"]), "agent_tile_accuracy": agent_tile_acc,
        "agent_slide_accuracy": agent_slide_acc, "probe_tile_accuracy": probe_tile_acc,
        "probe_slide_accuracy": probe_slide_acc, "agent_train_accuracy_last_50": float(np.mean(curve[-50:])),
        "agent_train_s": agent_s, "total_s": time.perf_counter() - started,
        "gate_met": agent_slide_acc >= 0.9 and agent_slide_acc >= probe_slide_acc - 0.05,
    }
    print(json.dumps(result, indent=1))
    print(f"| agent alone, {args.steps} steps | {agent_tile_acc:.3f} | {agent_slide_acc:.3f} |\n"
          f"| CNN probe on the agent's glimpses | {probe_tile_acc:.3f} | {probe_slide_acc:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
