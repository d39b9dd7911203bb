"""The end-of-run summary, from metrics built by hand."""

from __future__ import annotations

from limoe.console import metrics_table, routing_lines

METRICS = {
    "test/image_to_text_R@1": 0.5841, "test/text_to_image_R@1": 0.5632,
    "test/first_colour_zeroshot_top1": 0.999, "test/relation_zeroshot_top1": 1.0,
    "test_novel/image_to_text_R@1": 0.437, "test_novel/text_to_image_R@1": 0.415,
    "test_novel/first_colour_zeroshot_top1": 0.989,
    "routing/layer3/image_experts": 12.0, "routing/layer3/text_experts": 2.0,
    "routing/layer3/shared_experts": 2.0, "routing/layer3/unused_experts": 0.0,
    "routing/layer3/image_dropped": 0.0, "routing/layer3/text_dropped": 0.25,
}  # fmt: skip


def test_one_row_per_test_set_with_columns_as_wide_as_their_titles():
    header, test, novel = metrics_table(METRICS)
    assert header.split() == ["i->t", "R@1", "t->i", "R@1", "first_colour", "relation",
                              "(zero-shot", "top-1)"]  # fmt: skip
    assert test.split() == ["test", "0.584", "0.563", "0.999", "1.000"]
    assert novel.split() == ["test_novel", "0.437", "0.415", "0.989", "-"]  # no relation task
    for line in (test, novel):  # every value ends under the end of its title
        for title in ("first_colour", "relation"):
            end = header.index(title) + len(title)
            assert line[end - 1] != " " and (len(line) == end or line[end] == " ")


def test_one_routing_line_per_moe_layer():
    assert routing_lines(METRICS) == [
        "experts per MoE layer (image-only / text-only / shared / unused):",
        "  layer 3: 12 / 2 / 2 / 0 of 16; dropped 0.0% of image, 25.0% of text tokens",
    ]
