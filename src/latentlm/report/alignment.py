"""Alignment heatmaps of a translation model (M11): for a few sentence pairs, the prior
p(z_t | x, y_<t) (= soft attention's weights), the exact posterior p(z_t | x, y_<=t) of the
latent model and the inference network's q(z_t | x, y), side by side; rows are target words,
columns source words. Written as PNGs into a run's ``figures/``, which the report embeds."""

from __future__ import annotations

from pathlib import Path

import torch

from latentlm.data.parallel import ParallelDataset
from latentlm.device import module_device
from latentlm.inference.local import LocalELBO
from latentlm.io import atomic_write_bytes


@torch.no_grad()
def alignment_panels(system, dataset: ParallelDataset, index: int) -> dict[str, torch.Tensor]:
    """The (T, S) alignment distributions of example ``index``: ``prior``, and for the latent
    model ``exact posterior`` and (with an inference network) ``q``."""
    system.eval()
    batch = dataset.make_batch([index]).to(module_device(system))
    panels = system.model.alignments(batch)
    named = {"prior p(z_t | x, y_<t)" if system.model.attention == "latent" else "soft attention": panels["prior"]}
    if "posterior" in panels:
        named["exact posterior p(z_t | x, y)"] = panels["posterior"]
    if system.posterior is not None and isinstance(system.objective, LocalELBO):
        named["q(z_t | x, y)"] = system.posterior(batch).probs
    T, S = int(batch.lengths[0]), int(batch.source_lengths[0])
    return {k: v[0, :T, :S].float().cpu() for k, v in named.items()}


def plot_alignment(system, dataset: ParallelDataset, index: int) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = alignment_panels(system, dataset, index)
    source = dataset.source_words[index] + ["</s>"]
    target = dataset.target_words[index] + ["</s>"]
    fig, axes = plt.subplots(1, len(panels), figsize=(0.32 * len(source) * len(panels) + 2.5, 0.3 * len(target) + 1.6),
                             squeeze=False)
    for ax, (title, weights) in zip(axes[0], panels.items()):
        ax.imshow(weights.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(source)), source, rotation=90, fontsize=7)
        ax.set_yticks(range(len(target)), target, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_alignment_figures(system, dataset: ParallelDataset, out_dir: str | Path, indices=(0, 1, 2)) -> list[Path]:
    """``alignment_<i>.png`` for each example index, into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        if i < len(dataset):
            path = out_dir / f"alignment_{i}.png"
            atomic_write_bytes(path, plot_alignment(system, dataset, i))
            paths.append(path)
    return paths
