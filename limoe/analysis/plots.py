"""Routing figures. Each function returns a matplotlib ``Figure`` (no pyplot state, so they
work headless and display inline in notebooks); ``save`` writes it as PNG.

Every figure colours expert e with ``expert_colours(E)[e]``, so an expert looks the same
in the bars, the patch and word maps and the curves over training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from limoe.moe.statistics import MODALITY_NAMES

DROPPED_COLOUR = (0.85, 0.85, 0.85, 1.0)
# Modalities by colour (kept apart from the expert palette); statistics by line style.
MODALITY_COLOUR = {"image": "0.15", "text": "darkgoldenrod"}
LOCAL, GLOBAL = {"ls": "-", "marker": "o"}, {"ls": "--", "marker": "x"}
KIND_COLOURS = {"image": MODALITY_COLOUR["image"], "text": MODALITY_COLOUR["text"],
                "shared": "0.55", "unused": "0.85"}  # fmt: skip


def expert_colours(num_experts: int) -> list[tuple[float, ...]]:
    """One colour per expert: tab10, then tab20's light tones, then evenly spaced hues."""
    if num_experts <= 10:
        return [colormaps["tab10"](i) for i in range(num_experts)]
    if num_experts <= 20:
        light = [colormaps["tab20"](2 * i + 1) for i in range(10)]
        return [colormaps["tab10"](i) for i in range(10)] + light[: num_experts - 10]
    return [colormaps["hsv"](i / num_experts) for i in range(num_experts)]


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def expert_ticks(ax, num_experts: int) -> None:
    """Expert numbers under the bars, in the experts' colours, small enough not to run
    together (every second one from 25 experts on)."""
    step = 1 if num_experts <= 24 else 2
    ticks = list(range(0, num_experts, step))
    ax.set_xticks(ticks, [str(e) for e in ticks], fontsize=8 if num_experts <= 12 else 7)
    ax.set_xlim(-0.6, num_experts - 0.4)
    _colour_ticks(ax, [expert_colours(num_experts)[e] for e in ticks])


def _colour_ticks(ax, colours) -> None:
    for label, colour in zip(ax.get_xticklabels(), colours):
        label.set_color(colour)
        label.set_fontweight("bold")


def plot_expert_shares(summaries: Mapping[int, dict]) -> Figure:
    """Per layer, each expert's share of the layer's routed tokens, stacked by modality."""
    layers = list(summaries)
    num_experts = summaries[layers[0]]["num_experts"]
    colours = expert_colours(num_experts)
    fig = Figure(figsize=(max(6, 0.45 * num_experts + 2), 2.6 * len(layers)), layout="constrained")
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    x = np.arange(num_experts)
    for ax, layer in zip(axes, layers):
        s = summaries[layer]
        counts = {m: np.array(s["counts"][m], dtype=float) for m in MODALITY_NAMES}
        total = max(sum(c.sum() for c in counts.values()), 1.0)
        image, text = counts["image"] / total, counts["text"] / total
        ax.bar(x, image, color=colours, edgecolor="black", linewidth=0.5)
        ax.bar(x, text, bottom=image, color=[to_rgba(c, 0.35) for c in colours],
               edgecolor="black", linewidth=0.5, hatch="//")  # fmt: skip
        kinds = s["specialised"]
        ax.set_title(f"layer {layer}: {kinds['image']} image-only, {kinds['text']} text-only, "
                     f"{kinds['shared']} shared, {kinds['unused']} unused experts")  # fmt: skip
        expert_ticks(ax, num_experts)
        ax.set_ylim(0, 1.15 * max(float((image + text).max()), 1e-6))  # room above the tallest
        ax.set_ylabel("share of routed tokens")
    axes[-1].set_xlabel("expert")
    fig.legend(
        handles=[Patch(facecolor="grey", edgecolor="black", label="image patches"),
                 Patch(facecolor=to_rgba("grey", 0.35), edgecolor="black", hatch="//",
                       label="text tokens")],
        loc="outside upper right", ncol=2, fontsize=8,
    )  # fmt: skip
    fig.suptitle("Token share per expert, split by modality")
    return fig


def plot_image_fraction(summaries: Mapping[int, dict], threshold: float = 0.9) -> Figure:
    """Layers x experts heatmap of the share of each expert's tokens that are image patches."""
    layers = list(summaries)
    num_experts = summaries[layers[0]]["num_experts"]
    grid = np.array(
        [[np.nan if v is None else v for v in summaries[layer]["modality_fraction"]["image"]]
         for layer in layers]
    )  # fmt: skip
    fig = Figure(figsize=(max(6, 0.5 * num_experts + 2.5), 1.0 * len(layers) + 1.6),
                 layout="constrained")  # fmt: skip
    ax = fig.subplots()
    cmap = colormaps["coolwarm"].copy()
    cmap.set_bad(DROPPED_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for (i, e), value in np.ndenumerate(grid):
        text = "–" if np.isnan(value) else f"{value:.2f}"
        ax.text(e, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    _colour_ticks(ax, expert_colours(num_experts))
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="image share of the expert's tokens (1 = image only)")
    ax.set_title(f"Expert modality: > {threshold:.0%} image = image expert, "
                 f"< {1 - threshold:.0%} = text expert, grey = no tokens")  # fmt: skip
    return fig


def plot_specialisation(summaries: Mapping[int, dict]) -> Figure:
    """Per layer, how many experts are image-only, text-only, shared or unused."""
    layers = list(summaries)
    kinds = ("image", "text", "shared", "unused")
    labels = ("image-only", "text-only", "shared", "unused")
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(kinds)
    x = np.arange(len(layers))
    for j, (kind, label) in enumerate(zip(kinds, labels)):
        counts = [summaries[layer]["specialised"][kind] for layer in layers]
        bars = ax.bar(x + (j - 1.5) * width, counts, width, label=label, color=KIND_COLOURS[kind])
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, [f"layer {layer}" for layer in layers])
    ax.set_ylabel("experts")
    ax.set_title("Modality-specific and shared experts per MoE layer")
    ax.set_ylim(0, summaries[layers[0]]["num_experts"] * 1.3)
    ax.legend(ncol=len(kinds), loc="upper center", fontsize=8)
    return fig


def _entropy_lines(ax, x, summaries: Sequence[dict], num_experts: int) -> None:
    """Local (solid) and global (dashed) entropy of each modality over ``x``, with log E."""
    for m in MODALITY_NAMES:
        c = MODALITY_COLOUR[m]
        local = [s["entropy_local"][m] for s in summaries]
        glob = [s["entropy_global"][m] for s in summaries]
        ax.plot(x, local, **LOCAL, color=c, label=f"{m}: per token (local)")
        ax.plot(x, glob, **GLOBAL, color=c, label=f"{m}: of the mean (global)")
    ax.axhline(np.log(num_experts), color="grey", lw=0.8, ls=":", label="log E (uniform)")


def plot_routing_quality(summaries: Mapping[int, dict]) -> Figure:
    """Per modality and layer: routing entropy (per token and of the mean), first-choice
    router probability (gate confidence) and dropped share."""
    layers = list(summaries)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.arange(len(layers))
    num_experts = summaries[layers[0]]["num_experts"]
    _entropy_lines(axes[0], x, [summaries[layer] for layer in layers], num_experts)
    for m in MODALITY_NAMES:
        c = MODALITY_COLOUR[m]
        axes[1].plot(x, [summaries[layer]["top1_prob"][m] for layer in layers], **LOCAL,
                     color=c, label=m)  # fmt: skip
        axes[2].plot(x, [summaries[layer]["dropped"][m] for layer in layers], **LOCAL,
                     color=c, label=m)  # fmt: skip
    titles = ("Routing entropy (nats)", "Gate confidence", "Dropped tokens")
    ylabels = ("entropy", "mean first-choice router prob.", "share of choices dropped")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_xticks(x, [str(layer) for layer in layers])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        # under the panel, so no legend hides a curve
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    axes[1].set_ylim(0, 1.02)
    axes[2].set_ylim(bottom=0)
    return fig


def _expert_cmap(num_experts: int) -> ListedColormap:
    return ListedColormap([DROPPED_COLOUR, *expert_colours(num_experts)])


def draw_patch_experts(ax, image: np.ndarray, grid: np.ndarray, num_experts: int) -> None:
    """An image (uint8 [H, W, 3]) with each patch tinted and labelled by its expert
    (``grid`` [rows, cols], -1 = dropped, drawn ×)."""
    size = image.shape[0]
    ax.imshow(image)
    ax.imshow(grid + 1, cmap=_expert_cmap(num_experts), vmin=0, vmax=num_experts, alpha=0.6,
              extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")  # fmt: skip
    step = size / grid.shape[1]
    for (r, c), e in np.ndenumerate(grid):
        ax.text((c + 0.5) * step - 0.5, (r + 0.5) * step - 0.5, "×" if e < 0 else str(e),
                ha="center", va="center", fontsize=7, color="black")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def plot_patch_routing(
    images: np.ndarray, experts: Mapping[int, np.ndarray], num_experts: int
) -> Figure:
    """Sample images (uint8 [S, H, W, 3]) and, per layer, each patch coloured by its expert
    (``experts[layer]`` is [S, rows, cols], -1 = dropped)."""
    layers = list(experts)
    num = images.shape[0]
    fig = Figure(figsize=(1.9 * (1 + len(layers)), 1.9 * num + 0.8), layout="constrained")
    axes = fig.subplots(num, 1 + len(layers), squeeze=False)
    for i in range(num):
        axes[i, 0].imshow(images[i])
        for j, layer in enumerate(layers, start=1):
            draw_patch_experts(axes[i, j], images[i], experts[layer][i], num_experts)
    for j, title in enumerate(["image"] + [f"layer {layer}" for layer in layers]):
        axes[0, j].set_title(title)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _expert_legend(fig, num_experts)
    fig.suptitle("Expert of each image patch (first choice; × = dropped)")
    return fig


def _expert_legend(fig: Figure, num_experts: int) -> None:
    handles = [
        Patch(color=c, label=f"expert {e}") for e, c in enumerate(expert_colours(num_experts))
    ]
    handles.append(Patch(color=DROPPED_COLOUR, label="dropped"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(9, len(handles)), fontsize=7)


# What a caption figure says of a model whose text has no experts (model=clip_moe).
NO_ROUTED_CAPTION = "no caption token is routed: this model's experts are in its image tower only"
NOTE_FONTSIZE = 8  # the gates and shares written on a figure: 11 px at the figures' 100 dpi


def draw_word_experts(
    ax, words: Sequence[str], experts: Sequence[int], num_experts: int, y: float, x: float,
    notes: Sequence[Sequence[str]] = (),
) -> float:  # fmt: skip
    """Caption tokens from ``x`` on line ``y``, each boxed in its expert's colour (-1 =
    dropped), with ``notes[i]`` (lines of text) under token i; returns where the line
    ends."""
    colours = [DROPPED_COLOUR, *expert_colours(num_experts)]
    for i, (word, e) in enumerate(zip(words, experts)):
        ax.text(x, y, word, family="monospace", fontsize=9, va="center",
                bbox={"facecolor": colours[e + 1], "edgecolor": "none", "pad": 1.5})  # fmt: skip
        lines = notes[i] if i < len(notes) else ()
        for k, line in enumerate(lines, start=1):
            ax.text(x, y + 0.6 * k, line, family="monospace", fontsize=NOTE_FONTSIZE,
                    va="center")  # fmt: skip
        x += max([len(word), *(len(line) for line in lines)]) + 1.5
    return x


def plot_word_routing(
    captions: Sequence[Sequence[str]], experts: Mapping[int, Sequence[Sequence[int]]],
    num_experts: int,
) -> Figure:  # fmt: skip
    """Sample captions (token strings) with, per layer, each token boxed in its expert's colour
    (``experts[layer][i]`` holds caption i's experts, -1 = dropped)."""
    layers = list(experts)
    chars = max(sum(len(w) + 1.5 for w in words) for words in captions) + 10
    rows = len(captions) * (len(layers) + 0.6)
    fig = Figure(figsize=(max(6, 0.075 * chars), 0.32 * rows + 1.0), layout="constrained")
    ax = fig.subplots()
    y = 0.0
    for i, words in enumerate(captions):
        ax.text(0, y, f"caption {i}", fontsize=8, fontweight="bold", va="center")
        y += 0.6
        for layer in layers:
            ax.text(0, y, f"layer {layer}", fontsize=8, va="center", color="dimgrey")
            draw_word_experts(ax, words, experts[layer][i], num_experts, y, 10.0)
            y += 1
    ax.set_xlim(-0.5, chars)
    ax.set_ylim(y, -0.8)
    ax.axis("off")
    _expert_legend(fig, num_experts)
    fig.suptitle("Expert of each caption token (first choice)")
    return fig


def plot_message(title: str, message: str) -> Figure:
    """A figure that says why there is nothing to draw, in the place of the one expected."""
    fig = Figure(figsize=(6, 1.6), layout="constrained")
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, wrap=True)
    ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_pair_routing(image: np.ndarray, words: Sequence[str], routed, num_experts: int) -> Figure:
    """One pair at one MoE layer (``routed``: a ``PairRouting``): each patch by its expert,
    each patch's gate, each caption token by its expert with its gate and that expert's image
    share, and every expert's tokens split into image and text (the pair's experts
    outlined), so text-only experts stand as tall as the others."""
    fig = Figure(figsize=(12, 6.4), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1.3])
    experts_ax, gates_ax, share_ax = (fig.add_subplot(grid[0, i]) for i in range(3))
    draw_patch_experts(experts_ax, image, routed.patch_expert, num_experts)
    experts_ax.set_title("expert of each patch")
    shown = gates_ax.imshow(routed.patch_gate, cmap="Greys", vmin=0, vmax=1)
    size = min(NOTE_FONTSIZE, 56 / max(routed.patch_gate.shape))  # a 7 x 7 grid: 8 pt
    for (r, c), g in np.ndenumerate(routed.patch_gate):
        gates_ax.text(c, r, f"{g:.2f}", ha="center", va="center", fontsize=size,
                      color="white" if g > 0.6 else "black")  # fmt: skip
    gates_ax.set_xticks([])
    gates_ax.set_yticks([])
    gates_ax.set_title("gate of each patch")
    fig.colorbar(shown, ax=gates_ax, shrink=0.8)
    share = [np.nan if s is None else s for s in routed.image_share]
    draw_modality_shares(share_ax, share, routed, num_experts)
    words_ax = fig.add_subplot(grid[1, :])
    notes = [
        (f"g{g:.2f}", "img -" if e < 0 or share[e] != share[e] else f"img{share[e]:.0%}")
        for e, g in zip(routed.word_expert, routed.word_gate)
    ]
    end = draw_word_experts(words_ax, words, routed.word_expert, num_experts, 0.0, 0.0, notes)
    if not words:  # model=clip_moe: the text tower has no experts
        words_ax.text(0.0, 0.0, NO_ROUTED_CAPTION, fontsize=10, va="center")
    words_ax.set_xlim(-0.5, max(end, 20))
    words_ax.set_ylim(1.8, -0.8)
    words_ax.axis("off")
    words_ax.set_title("expert of each caption token (gate g, the expert's image share)",
                       fontsize=10)  # fmt: skip
    fig.suptitle(f"pair {routed.pair}, MoE layer {routed.layer} (first choices; × = dropped)")
    return fig


def draw_modality_shares(ax, image_share: Sequence[float], routed, num_experts: int) -> None:
    """Each expert's tokens as one bar of height 1, image share solid below and text share
    hatched above (none for an expert without tokens), outlined where this pair's tokens
    went."""
    colours = expert_colours(num_experts)
    image = np.nan_to_num(np.asarray(image_share, dtype=float), nan=0.0)
    text = np.where(np.isnan(image_share), 0.0, 1.0 - image)
    used = set(routed.patch_expert.ravel().tolist()) | set(routed.word_expert)
    x = np.arange(num_experts)
    ax.bar(x, image, color=colours, edgecolor="none")
    ax.bar(x, text, bottom=image, color=[to_rgba(c, 0.35) for c in colours], hatch="//",
           edgecolor="none")  # fmt: skip
    outlined = [e for e in x if e in used and image_share[e] == image_share[e]]
    ax.bar(outlined, 1.0, fill=False, edgecolor="black", linewidth=1.5)
    ax.set_ylim(0, 1.0)
    expert_ticks(ax, num_experts)
    ax.set_xlabel("expert (outlined: used by this pair)")
    ax.set_ylabel("share of the expert's tokens")
    ax.set_title("image (solid) and text (hatched) share of each expert", fontsize=10)


def plot_content_routing(
    tables: Mapping[int, np.ndarray], groups: Sequence[str], token_counts: Sequence[int]
) -> Figure:
    """Per layer, a groups x experts heatmap: the share of each content group's tokens
    (shape / edge / background patches; colour, shape, position ... words) each expert takes."""
    layers = list(tables)
    num_experts = next(iter(tables.values())).shape[1]
    labels = [f"{g} (n={n})" for g, n in zip(groups, token_counts)]
    fig = Figure(figsize=(max(7, 0.45 * num_experts + 3), (0.3 * len(groups) + 0.9) * len(layers)),
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, layer in zip(axes, layers):
        image = ax.imshow(tables[layer], cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (g, e), value in np.ndenumerate(tables[layer]):
            if value >= 0.05:
                colour = "white" if value > 0.6 else "black"
                ax.text(e, g, f"{value:.2f}", ha="center", va="center", fontsize=NOTE_FONTSIZE,
                        color=colour)  # fmt: skip
        ax.set_yticks(range(len(groups)), labels, fontsize=8)
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
        _colour_ticks(ax, expert_colours(num_experts))
        ax.set_title(f"layer {layer}")
    # One bar for every panel (the scale is the same): one per panel wrote its label over the
    # next panel's.
    fig.colorbar(image, ax=list(axes), label="share of the group's tokens", shrink=0.6)
    axes[-1].set_xlabel("expert")
    fig.suptitle("Which experts take which content")
    return fig


def plot_history(history: Sequence[dict]) -> Figure:
    """Over training (``RoutingHistory`` records): per layer, each expert's image share of its
    tokens, and the per-modality routing entropy, against step."""
    steps = [record["step"] for record in history]
    layers = list(history[0]["layers"])
    num_experts = history[0]["layers"][layers[0]]["num_experts"]
    colours = expert_colours(num_experts)
    fig = Figure(figsize=(12, 3.0 * len(layers) + 0.6), layout="constrained")
    axes = fig.subplots(len(layers), 2, squeeze=False)
    for row, layer in zip(axes, layers):
        summaries = [record["layers"][layer] for record in history]
        for e in range(num_experts):
            fraction = [s["modality_fraction"]["image"][e] for s in summaries]
            fraction = [np.nan if f is None else f for f in fraction]
            row[0].plot(steps, fraction, color=colours[e], marker=".", label=f"expert {e}")
        row[0].set_ylim(-0.02, 1.02)
        row[0].set_ylabel("image share of expert's tokens")
        row[0].set_title(f"layer {layer}: expert modality over training")
        _entropy_lines(row[1], steps, summaries, num_experts)
        row[1].set_ylabel("entropy (nats)")
        row[1].set_title(f"layer {layer}: routing entropy over training")
        row[1].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(8, num_experts), fontsize=7)
    return fig


def plot_arm_expert_shares(arms: Mapping[str, Mapping[str, dict]]) -> Figure:
    """One row per arm, one column per MoE layer: each expert's share of the layer's routed
    tokens, image patches solid and text tokens hatched, experts sorted by their total share
    (``arms``: arm -> layer -> ``layer_summary``, e.g. a run's last ``RoutingHistory``)."""
    names = list(arms)
    # Every arm's MoE layers (arms may put their experts in different blocks).
    layers = sorted({layer for summaries in arms.values() for layer in summaries}, key=int)
    fig = Figure(figsize=(4.2 * len(layers) + 0.5, 1.9 * len(names) + 0.8), layout="constrained")
    axes = fig.subplots(len(names), len(layers), squeeze=False, sharey=True)
    for row, arm in zip(axes, names):
        for ax, layer in zip(row, layers):
            if layer not in arms[arm]:
                ax.set_title(f"{arm}: no MoE layer {layer}", fontsize=8)
                ax.set_axis_off()
                continue
            s = arms[arm][layer]
            image = np.array(s["counts"]["image"], dtype=float)
            text = np.array(s["counts"]["text"], dtype=float)
            total = max(image.sum() + text.sum(), 1.0)
            order = np.argsort(-(image + text), kind="stable")
            x = np.arange(len(order))
            ax.bar(x, image[order] / total, color="tab:blue", edgecolor="black", linewidth=0.4)
            ax.bar(x, text[order] / total, bottom=image[order] / total, color="tab:orange",
                   edgecolor="black", linewidth=0.4, hatch="//")  # fmt: skip
            kinds = s["specialised"]
            ax.set_title(f"{arm}, layer {layer}: {kinds['image']} img / {kinds['text']} txt / "
                         f"{kinds['shared']} shared / {kinds['unused']} unused", fontsize=8)  # fmt: skip
            ax.set_xticks(x, [str(e) for e in order], fontsize=6)
        row[0].set_ylabel("share of tokens")
    for ax in axes[-1]:
        ax.set_xlabel("expert (by share)")
    axes[0, 0].legend(
        handles=[Patch(facecolor="tab:blue", edgecolor="black", label="image patches"),
                 Patch(facecolor="tab:orange", edgecolor="black", hatch="//",
                       label="text tokens")], fontsize=7,
    )  # fmt: skip
    fig.suptitle("Token share per expert, per arm (last validation, first seed)")
    return fig


def plot_collapse(arms: Mapping[str, Sequence[Sequence[dict]]]) -> Figure:
    """Collapse over training: per modality, the busiest expert's share of that modality's
    tokens (the largest over MoE layers) against step, mean over seeds per arm; at 0.5 or
    more one expert takes half a modality (``arms``: arm -> one history per seed)."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, len(MODALITY_NAMES), squeeze=False, sharey=True)[0]
    for ax, name in zip(axes, MODALITY_NAMES):
        for arm, histories in arms.items():
            curves = [
                {r["step"]: max(max(s["share"][name]) for s in r["layers"].values()) for r in h}
                for h in histories
            ]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [float(np.mean([c[step] for c in curves])) for step in steps]
            ax.plot(steps, mean, marker=".", label=f"{arm} (n={len(curves)})")
        ax.axhline(0.5, color="black", linestyle=":", linewidth=1)
        ax.set_title(f"{name}: busiest expert's share")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the modality's tokens")
    axes[-1].legend(fontsize=7)
    return fig
