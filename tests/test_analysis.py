"""Routing analysis: statistics against hand-built routing records, token origins and content
groups by hand, the collected record against routing each pair alone, figure colours."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

from limoe import create_model
from limoe.analysis import plots
from limoe.analysis.explorer import RoutingExplorer
from limoe.analysis.report import pair_routing_figure
from limoe.analysis.routing import (
    RoutingRecord,
    collect_routing,
    content_table,
    image_group,
    pair_routing,
    patch_coverage,
    patch_experts,
    word_experts,
)
from limoe.data.scenes import ScenesDataset
from limoe.data.shapes import CAPTION_TEMPLATES, COLOURS, Attributes, ShapesDataset, caption_roles
from limoe.lit.callbacks import read_history
from limoe.models.limoe import IMAGE, TEXT, LIMoE
from limoe.moe import Routing
from limoe.moe.statistics import concat_routings, expert_kinds, layer_summary

IMG, TXT = IMAGE, TEXT


def hand_routing() -> Routing:
    """4 experts, top-1. Image tokens -> experts 0, 0, 1, 2 (the last dropped), each with a
    one-hot router distribution; text tokens -> 1, 2, 2, uniform over experts 0..2.
    Expert 3 gets nothing."""
    eye = torch.eye(4)
    third = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0])
    return Routing(
        expert_index=torch.tensor([[0], [0], [1], [2], [1], [2], [2]]),
        gates=torch.ones(7, 1),
        dropped=torch.tensor([[False], [False], [False], [True], [False], [False], [False]]),
        probs=torch.stack([eye[0], eye[0], eye[1], eye[2], third, third, third]),
        modality=torch.tensor([IMG, IMG, IMG, IMG, TXT, TXT, TXT]),
        capacity=2,
        aux_losses={"load/image": torch.tensor(1.0)},
        aux_loss=torch.tensor(0.5),
    )


def test_layer_summary_by_hand():
    s = layer_summary(hand_routing())
    assert s["tokens"] == {"image": 4, "text": 3}
    assert s["counts"] == {"image": [2, 1, 0, 0], "text": [0, 1, 2, 0]}
    assert s["share"]["image"] == pytest.approx([0.5, 0.25, 0.0, 0.0])
    assert s["share"]["text"] == pytest.approx([0.0, 1 / 3, 2 / 3, 0.0])
    assert s["dropped"] == pytest.approx({"image": 0.25, "text": 0.0})
    # expert 0: 2 image / 0 text; expert 1: 1 / 1; expert 2: 0 / 2 (its image token dropped)
    assert s["modality_fraction"]["image"] == pytest.approx([1.0, 0.5, 0.0, None])
    assert s["kind"] == ["image", "shared", "text", "unused"]
    assert s["specialised"] == {"image": 1, "text": 1, "shared": 1, "unused": 1}
    # one-hot image routing: no per-token entropy; its mean [.5, .25, .25, 0] has 1.5 ln 2
    assert s["entropy_local"]["image"] == pytest.approx(0.0, abs=1e-6)
    assert s["entropy_global"]["image"] == pytest.approx(1.5 * math.log(2))
    assert s["entropy_local"]["text"] == pytest.approx(math.log(3))
    assert s["entropy_global"]["text"] == pytest.approx(math.log(3))
    assert s["top1_prob"] == pytest.approx({"image": 1.0, "text": 1 / 3})
    assert s["gate"] == pytest.approx({"image": 1.0, "text": 1.0})
    json.dumps(s)  # plain numbers only


def test_layer_summary_gate_is_the_mean_kept_gate_not_the_top_probability():
    """A bias may pick an expert the router gives little probability: the gate then parts from
    ``top1_prob``. The dropped image choice (gate 0.2) is left out."""
    r = hand_routing()
    gates = torch.tensor([[0.5], [0.7], [0.9], [0.2], [0.3], [0.3], [0.6]])
    s = layer_summary(Routing(r.expert_index, gates, r.dropped, r.probs, r.modality, 2, {},
                              r.aux_loss))  # fmt: skip
    assert s["gate"] == pytest.approx({"image": (0.5 + 0.7 + 0.9) / 3, "text": 0.4})
    assert s["top1_prob"] == pytest.approx({"image": 1.0, "text": 1 / 3})


def test_layer_summary_of_an_empty_modality_is_zero_not_nan():
    r = hand_routing()
    image_only = Routing(r.expert_index[:4], r.gates[:4], r.dropped[:4], r.probs[:4],
                         r.modality[:4], 2, {}, r.aux_loss)  # fmt: skip
    s = layer_summary(image_only)
    assert s["tokens"]["text"] == 0
    assert s["dropped"]["text"] == s["entropy_local"]["text"] == s["top1_prob"]["text"] == 0.0
    assert s["gate"]["text"] == 0.0
    assert s["kind"] == ["image", "image", "unused", "unused"]


def test_expert_kinds_threshold_is_strict():
    counts = torch.tensor([[9, 1], [10, 0], [1, 99], [0, 0]])
    assert expert_kinds(counts, ("image", "text"), 0.9) == ["shared", "image", "text", "unused"]
    assert expert_kinds(counts, ("image", "text"), 0.5) == ["image", "image", "text", "unused"]
    # 1% of the 120 tokens is 1.2: expert 0's 10 count, a 1-token expert would not
    few = torch.tensor([[10, 0], [1, 0], [0, 109]])
    assert expert_kinds(few, ("image", "text"), 0.9, min_share=0.01) == ["image", "unused", "text"]
    assert expert_kinds(few, ("image", "text"), 0.9) == ["image", "image", "text"]
    with pytest.raises(ValueError, match="threshold must be in"):
        expert_kinds(counts, ("image", "text"), 1.0)


def test_concat_routings_equals_the_whole():
    r = hand_routing()
    halves = [
        Routing(r.expert_index[a:b], r.gates[a:b], r.dropped[a:b], r.probs[a:b],
                r.modality[a:b], 2, {"load/image": torch.tensor(v)}, r.aux_loss)
        for a, b, v in ((0, 3, 1.0), (3, 7, 3.0))
    ]  # fmt: skip
    whole = concat_routings(halves)
    assert layer_summary(whole) == layer_summary(r)
    assert float(whole.aux_losses["load/image"]) == 2.0


def test_routing_records_carry_each_tokens_origin_in_tower_order():
    """The MoE layers' records say where each token came from (pair, patch or position), and
    collect_routing offsets the pairs of later batches and reads the text tokens' ids."""
    torch.manual_seed(0)
    model = LIMoE(embed_dim=16, image_size=16, patch_size=8, width=16, depth=2, num_heads=2,
                  context_length=5, moe_layers=[1], moe={"num_experts": 4}).eval()  # fmt: skip
    # two pairs, 4 patches each; captions of 3 and 4 real tokens (end token = largest id)
    tokens = torch.tensor([[49406, 7, 49407, 0, 0], [49406, 8, 9, 49407, 0]])
    images = torch.randn(2, 3, 16, 16)
    (routing,) = model.tower(images, tokens)[2]
    routing = routing.real()  # the padding is routed too, and left out of the record
    assert routing.modality.tolist() == [IMG] * 8 + [TXT] * 7
    assert routing.sequence.tolist() == [0] * 4 + [1] * 4 + [0, 0, 0, 1, 1, 1, 1]
    assert routing.position.tolist() == [0, 1, 2, 3] * 2 + [0, 1, 2, 0, 1, 2, 3]
    text_only = model.tower(None, tokens)[2][0].real()
    assert text_only.sequence.tolist() == [0, 0, 0, 1, 1, 1, 1]
    pairs = [(images[i], tokens[i]) for i in range(2)]
    record = collect_routing(model, pairs, batch_size=1, progress=False)
    assert record.pair.tolist() == [0] * 4 + [0, 0, 0] + [1] * 4 + [1, 1, 1, 1]
    assert record.position.tolist() == [0, 1, 2, 3, 0, 1, 2] + [0, 1, 2, 3, 0, 1, 2, 3]
    assert record.token_id.tolist() == [-1] * 4 + [49406, 7, 49407] + [-1] * 4 + [
        49406, 8, 9, 49407,
    ]  # fmt: skip


def hand_record() -> RoutingRecord:
    """The hand routing as two pairs: pair 0 has patches 0, 1 and a 2-token caption;
    pair 1 has patches 0, 1 and a 1-token caption, on a 1 x 2 patch grid."""
    return RoutingRecord(
        layers=[3],
        routings=[hand_routing()],
        modality=torch.tensor([IMG, IMG, IMG, IMG, TXT, TXT, TXT]),
        pair=torch.tensor([0, 0, 1, 1, 0, 0, 1]),
        position=torch.tensor([1, 0, 0, 1, 0, 1, 0]),
        token_id=torch.tensor([-1, -1, -1, -1, 5, 6, 7]),
        grid_size=(1, 2),
        patch_size=4,
    )


def test_patch_and_word_experts_by_hand():
    record = hand_record()
    # pair 0: patch 1 -> 0, patch 0 -> 0; pair 1: patch 0 -> 1, patch 1 -> 2 but dropped
    assert patch_experts(record, 3, [0, 1]).tolist() == [[[0, 0]], [[1, -1]]]
    assert word_experts(record, 3, 0) == ([5, 6], [1, 2])
    assert word_experts(record, 3, 1) == ([7], [2])


def test_pair_routing_by_hand():
    record = hand_record()
    record.routings[0].gates = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3]])
    share = [1.0, 0.5, 0.0, None]
    routed = pair_routing(record, 3, 1, share)
    # pair 1: patch 0 is token 2 (expert 1, gate 0.7); patch 1 is token 3, dropped (gate 0)
    assert routed.patch_expert.tolist() == [[1, -1]]
    assert routed.patch_gate == pytest.approx(np.array([[0.7, 0.0]]))
    assert (routed.token_ids, routed.word_expert) == ([7], [2])
    assert routed.word_gate == pytest.approx([0.3])
    assert routed.image_share == share
    # pair 0's caption: positions 0, 1 are tokens 4, 5
    assert pair_routing(record, 3, 0, share).word_gate == pytest.approx([0.5, 0.4])
    with pytest.raises(ValueError, match=r"pair 5 was not routed"):
        pair_routing(record, 3, 5, share)
    with pytest.raises(ValueError, match=r"layer 1 is not a MoE layer \(MoE layers: \[3\]\)"):
        pair_routing(record, 1, 0, share)


def test_content_table_by_hand():
    groups = ["image/shape", "image/background", "image/shape", "image/shape",
              "text/colour", "text/colour", "text/other"]  # fmt: skip
    names = ("image/shape", "image/background", "text/colour", "text/other", "text/size")
    table = content_table(hand_record(), 3, groups, names)
    # image/shape: tokens 0, 2, 3 -> experts 0, 1, (2 dropped)
    assert table[0] == pytest.approx([1 / 3, 1 / 3, 0, 0])
    assert table[1] == pytest.approx([1, 0, 0, 0])
    assert table[2] == pytest.approx([0, 0.5, 0.5, 0])
    assert table[3] == pytest.approx([0, 0, 1, 0])
    assert table[4] == pytest.approx([0, 0, 0, 0])  # empty group


def test_patch_coverage_and_groups_by_hand():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True  # patch 0 fully covered
    mask[3, 3] = True  # one pixel of patch 3
    assert patch_coverage(mask, 2).tolist() == [1.0, 0.0, 0.0, 0.25]
    assert [image_group(c) for c in (1.0, 0.5, 0.25, 0.0)] == [
        "shape", "shape", "edge", "background"
    ]  # fmt: skip


def test_caption_roles_find_multi_token_values_and_leave_template_words():
    dataset = ShapesDataset("test", 1)
    template = CAPTION_TEMPLATES.index(
        "an image of a {size} {colour} {shape} located at the {position} on {background}."
    )
    attrs = Attributes(colour=COLOURS.index("cyan"), shape=0, size=1, position=0,
                       background=0, template=template)  # fmt: skip
    tokens = dataset.tokens(attrs.caption())
    roles = caption_roles(attrs.names, attrs.mention, tokens, dataset.tokenizer)
    words = [dataset.tokenizer.decoder[int(t)].replace("</w>", "") for t in tokens if t]
    said = dict(zip(words, roles))
    # "an image ...": a template word, though "cy" + "an" spells cyan later on
    assert [r for w, r in zip(words, roles) if w in ("cy", "an")] == ["other", "colour", "colour"]
    assert said["large"] == "size" and said["circle"] == "shape"
    assert said["top"] == said["left"] == "position" and said["black"] == "background"
    assert roles[0] == roles[len(words) - 1] == "start/end"
    assert roles[len(words) :] == ["other"] * (len(roles) - len(words))  # padding


TINY = ["data=shapes", "model.width=32", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def tiny_limoe():
    torch.manual_seed(0)  # dropless: a token's expert does not depend on the other tokens
    moe = ["model.moe_layers=[0,1]", "model.moe.num_experts=4", "model.moe.capacity_factor=null"]
    return create_model("limoe", overrides=TINY + moe)


def test_collect_routing_matches_routing_each_pair_alone():
    model = tiny_limoe().eval()  # no gating noise
    dataset = ShapesDataset("test", 7, context_length=24)
    record = collect_routing(model, dataset, num_pairs=7, batch_size=3, progress=False)
    assert record.layers == [0, 1] and record.grid_size == (4, 4)
    for pair in (0, 4, 6):
        image, tokens = dataset[pair]
        _, _, alone = model.tower(image[None], tokens[None])
        alone = [routing.real() for routing in alone]  # without the routed padding
        for layer, routing in zip(record.layers, alone):
            patches = patch_experts(record, layer, [pair])[0].reshape(-1)
            assert patches.tolist() == routing.expert_index[:16, 0].tolist()
            ids, experts = word_experts(record, layer, pair)
            assert experts == routing.expert_index[16:, 0].tolist()
            assert ids == tokens[: len(ids)].tolist() and ids[-1] == int(tokens.max())


def test_routing_explorer_draws_what_the_record_holds():
    """Driven as a person would (the drop-downs' values), headless: each redraw shows the
    chosen pair's first choices, gates and the experts' image shares from collect_routing."""
    model = tiny_limoe().eval()
    dataset = ShapesDataset("test", 5, context_length=24)
    record = collect_routing(model, dataset, num_pairs=5, batch_size=5, progress=False)
    explorer = RoutingExplorer(record, dataset)
    assert explorer.shown.pair == 0 and explorer.shown.layer == 0  # drawn on creation
    explorer.pair.value = 3
    explorer.layer.value = 1
    shown, figure = explorer.shown, explorer.figure
    assert (shown.pair, shown.layer) == (3, 1)
    routing = record.routing(1)
    is_pair = record.pair == 3
    image = is_pair & (record.modality == IMAGE)
    order = record.position[image].argsort()
    assert shown.patch_expert.reshape(-1).tolist() == routing.expert_index[image, 0][order].tolist()
    gates = routing.gates[image, 0][order].numpy()
    assert shown.patch_gate.reshape(-1) == pytest.approx(gates)
    text = is_pair & (record.modality == TEXT)
    order = record.position[text].argsort()
    assert shown.word_expert == routing.expert_index[text, 0][order].tolist()
    assert shown.word_gate == pytest.approx(routing.gates[text, 0][order].tolist())
    fraction = layer_summary(routing)["modality_fraction"]["image"]
    assert shown.image_share == fraction
    # The figure: the patch overlay holds expert + 1 per patch, the gate map the gates, and
    # the bars each expert's image share.
    experts_ax, gates_ax, share_ax = figure.axes[:3]
    overlay = np.asarray(experts_ax.get_images()[1].get_array())
    assert overlay.tolist() == (shown.patch_expert + 1).tolist()
    assert np.asarray(gates_ax.get_images()[0].get_array()) == pytest.approx(shown.patch_gate)
    heights = [b.get_height() for b in share_ax.patches]
    experts = len(fraction)
    assert heights[:experts] == pytest.approx([0.0 if f is None else f for f in fraction])
    assert heights[experts : 2 * experts] == pytest.approx(
        [0.0 if f is None else 1 - f for f in fraction]
    )  # the text share on top: every expert with tokens stands at 1
    assert figure.get_suptitle().startswith("pair 3, MoE layer 1")
    label, value = explorer.pair.options[3]
    assert value == 3 and label.startswith("3: a photo")  # each pair by its caption
    assert dataset.caption(3).startswith(label[3:].rstrip("…")) and len(label) <= 3 + 80


def drawn(figure):
    """Lay the figure out as saving it would (an Agg canvas), and return its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def sixteen_experts() -> tuple:
    """A record of a 16-expert LIMoE on scenes pairs, and its summaries."""
    torch.manual_seed(0)
    model = create_model("limoe", overrides=["model.moe.num_experts=16"]).eval()
    dataset = ScenesDataset("test", 12)
    record = collect_routing(model, dataset, num_pairs=12, batch_size=12, progress=False)
    return record, dataset, record.summaries()


def test_routing_figures_read_well_at_sixteen_experts():
    """What a person saw in notebook 02: expert numbers that ran together from 10 up, text-only
    experts with bars of no height, 5 px gate numbers, legends over the bars and curves."""
    record, dataset, summaries = sixteen_experts()
    layer = record.layers[1]
    share = summaries[layer]["modality_fraction"]["image"]
    figure, routed = pair_routing_figure(record, dataset, layer, 3, share)
    renderer = drawn(figure)
    share_ax, gates_ax = figure.axes[2], figure.axes[1]
    labels = [t.get_window_extent(renderer) for t in share_ax.get_xticklabels()]
    assert len(labels) == 16 and not any(_overlap(a, b) for a, b in zip(labels, labels[1:]))
    bars = share_ax.patches
    for e, f in enumerate(share):  # every expert with tokens stands at 1, text-only ones too
        assert bars[e].get_height() + bars[16 + e].get_height() == pytest.approx(
            0.0 if f is None else 1.0
        )
    assert any(f == 0.0 for f in share)  # a text-only expert is there to be seen
    pixels = [t.get_fontsize() * figure.dpi / 72 for t in gates_ax.texts]
    words = figure.axes[-1].texts
    pixels += [t.get_fontsize() * figure.dpi / 72 for t in words]
    assert min(pixels) >= 11
    shares = plots.plot_expert_shares(summaries)
    renderer = drawn(shares)
    legend = shares.legends[0].get_window_extent(renderer)
    for ax in shares.axes:
        top = max(p.get_y() + p.get_height() for p in ax.patches)
        assert top < ax.get_ylim()[1]  # the tallest bar keeps clear of the frame
        for p in ax.patches:
            assert not _overlap(legend, p.get_window_extent(renderer))
    quality = plots.plot_routing_quality(summaries)
    renderer = drawn(quality)
    for ax in quality.axes:
        box = ax.get_legend().get_window_extent(renderer)
        for line in ax.get_lines():
            points = ax.transData.transform(line.get_xydata())
            assert not any(box.contains(x, y) for x, y in points), line.get_label()
    tables = {layer: np.full((3, 16), 0.3) for layer in (0, 1, 2, 3)}
    content = plots.plot_content_routing(tables, ["image/shape", "image/edge", "text/colour"],
                                         [10, 20, 30])  # fmt: skip
    renderer = drawn(content)
    bars = [ax for ax in content.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1  # one scale, so no colour-bar label runs into the next panel's
    assert min(t.get_fontsize() * content.dpi / 72 for ax in content.axes for t in ax.texts) >= 11


def test_collect_routing_refuses_a_model_without_experts():
    model = create_model("dense", overrides=TINY)
    with pytest.raises(ValueError, match="no MoE layers"):
        collect_routing(model, ShapesDataset("test", 2), progress=False)


def test_every_figure_gives_expert_e_the_same_colour():
    s = layer_summary(hand_routing())
    colours = plots.expert_colours(4)
    assert len({tuple(c) for c in plots.expert_colours(16)}) == 16
    bars = plots.plot_expert_shares({3: s}).axes[0].patches[:4]
    assert [b.get_facecolor() for b in bars] == [to_rgba(c) for c in colours]
    history = [{"step": k, "layers": {"3": s}} for k in (10, 20)]
    lines = {ln.get_label(): ln for ln in plots.plot_history(history).axes[0].get_lines()}
    assert to_rgba(lines["expert 2"].get_color()) == to_rgba(colours[2])
    for fig in (plots.plot_routing_quality({3: s}), plots.plot_specialisation({3: s})):
        assert all(ax.get_title() and ax.get_ylabel() and ax.get_legend() for ax in fig.axes)


def test_read_history_keeps_the_last_record_of_a_step(tmp_path):
    lines = [{"step": 4, "layers": {"v": 1}}, {"step": 2, "layers": {}},
             {"step": 4, "layers": {"v": 2}}]  # fmt: skip
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_history(path) == [lines[1], lines[2]]


def test_switched_share_by_hand():
    from limoe.moe.statistics import switched_share

    previous, current = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])
    shares = switched_share(previous, current, torch.tensor([0, 0, 0, 1]))
    assert shares == pytest.approx({"image": 1 / 3, "text": 1.0})
    assert switched_share(previous, previous, torch.tensor([0, 0, 0, 0])) == {
        "image": 0.0,
        "text": 0.0,
    }


def test_arm_expert_shares_plot_arms_with_experts_in_different_blocks():
    """One arm with experts in blocks 0 and 2, another in block 2 only: one column per block
    any arm has, and an empty, titled panel where an arm has none."""

    def summary(counts):
        return {"counts": {"image": counts, "text": [0] * len(counts)},
                "specialised": {"image": 2, "text": 0, "shared": 0, "unused": 0}}  # fmt: skip

    fig = plots.plot_arm_expert_shares({
        "all": {"0": summary([3, 1]), "2": summary([2, 2])},
        "late": {"2": summary([1, 3])},
    })  # fmt: skip
    axes = fig.axes
    assert len(axes) == 4
    assert axes[2].get_title() == "late: no MoE layer 0" and not axes[2].axison
    assert axes[3].get_title().startswith("late, layer 2:")
