"""An interactive routing explorer for notebooks: pick a routed pair and a MoE layer, and see
each patch and caption token coloured by its expert, its gate, and that expert's image share.
It draws with ``limoe-analyze``'s figure functions (``report.pair_routing_figure``), so what
it shows is what the report would.

ipywidgets comes with ``pip install '.[notebooks]'`` (``make`` installs it); the rest of
the library does not need it.
"""

from __future__ import annotations

from limoe.analysis.report import pair_routing_figure
from limoe.analysis.routing import PairRouting, RoutingRecord


def _widgets():
    try:
        import ipywidgets
    except ImportError:  # pragma: no cover - the test environment has the extra
        raise ValueError(
            "the routing explorer needs ipywidgets: pip install 'limoe-torch[notebooks]'"
        ) from None
    return ipywidgets


def pair_label(dataset, pair: int, width: int = 80) -> str:
    """``"12: a red circle left of a blue square"``: the pair's number and caption, cut to
    ``width`` characters, as the pair drop-down lists them."""
    caption = dataset.caption(pair)
    if len(caption) > width:
        caption = caption[: width - 1] + "…"
    return f"{pair}: {caption}"


class RoutingExplorer:
    """``display(RoutingExplorer(record, dataset))`` in a notebook: two drop-downs (the pair,
    listed by its caption, and the MoE layer) above the pair's routing figure, redrawn on
    every change.

    ``record`` comes from ``collect_routing``, ``dataset`` is the one it routed (it gives the
    images and the tokenizer). ``shown`` holds the routing drawn last, ``figure`` its figure.
    """

    def __init__(self, record: RoutingRecord, dataset, threshold: float = 0.9) -> None:
        widgets = _widgets()
        self.record, self.dataset = record, dataset
        summaries = record.summaries(threshold)
        self.image_share = {
            layer: summary["modality_fraction"]["image"] for layer, summary in summaries.items()
        }
        self.pair = widgets.Dropdown(
            options=[(pair_label(dataset, p), p) for p in record.pairs], description="pair",
            layout=widgets.Layout(width="48em"),
        )  # fmt: skip
        self.layer = widgets.Dropdown(
            options=[(f"layer {layer}", layer) for layer in record.layers], description="MoE"
        )
        self.output = widgets.Output()
        self.shown: PairRouting | None = None
        self.figure = None
        for control in (self.pair, self.layer):
            control.observe(self.draw, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.pair, self.layer]), self.output])
        self.draw()

    def draw(self, change: dict | None = None) -> None:
        """Draw the chosen pair at the chosen layer (the drop-downs' callback)."""
        from IPython.display import display

        layer = self.layer.value
        self.figure, self.shown = pair_routing_figure(
            self.record, self.dataset, layer, self.pair.value, self.image_share[layer]
        )
        self.output.clear_output(wait=True)
        with self.output:
            display(self.figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
