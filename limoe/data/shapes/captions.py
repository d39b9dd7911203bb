"""The caption language: full caption templates, partial captions that name only some
attributes, and the role of each token of a tokenised caption."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from open_clip.tokenizer import SimpleTokenizer

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "a photo of a {size} {colour} {shape} at the {position}, {background} background.",
    "there is a {size} {colour} {shape} in the {position} over a {background} background.",
    "{background} background with a {size} {colour} {shape} in the {position}",
    "the {colour} {shape} is {size} and sits in the {position} of a {background} image.",
    "an image of a {size} {colour} {shape} located at the {position} on {background}.",
)

# Partial captions name only some attributes ("a red shape in the top left"). Training on a
# share of them teaches the text tower that a short description matches every image it fits,
# which is what zero-shot prompts ("a {} shape.") ask of it.
MENTION_ORDER: tuple[str, ...] = ("size", "colour", "shape", "position", "background")
FULL_MENTION = (1 << len(MENTION_ORDER)) - 1
PARTIAL_TEMPLATES: tuple[str, ...] = ("a {noun}{where}{on}", "a photo of a {noun}{where}{on}.")


def partial_caption(names: dict[str, str], mention: int, template: int = 0) -> str:
    """A caption naming only the attributes whose bit is set in ``mention``."""
    said = {a: names[a] for i, a in enumerate(MENTION_ORDER) if mention >> i & 1}
    noun = [said[a] for a in ("size", "colour") if a in said] + [said.get("shape", "shape")]
    where = f" in the {said['position']}" if "position" in said else ""
    on = f" on a {said['background']} background" if "background" in said else ""
    fill = {"noun": " ".join(noun), "where": where, "on": on}
    return PARTIAL_TEMPLATES[template % len(PARTIAL_TEMPLATES)].format(**fill)


def caption_roles(
    names: Mapping[str, str], mention: int, token_ids: Sequence[int], tokenizer: SimpleTokenizer
) -> list[str]:
    """The role of each token of a tokenised caption that names the attributes ``names``
    (``Attributes.names``) whose bit is set in ``mention``: the attribute whose value it
    spells (``"colour"``, ``"shape"``, ``"size"``, ``"position"``, ``"background"``),
    ``"start/end"`` for the start and end tokens, ``"other"`` for template words and padding.

    Values are found as token runs in the caption, not token by token: "cyan" is the two
    tokens "cy" + "an", and "an" alone is also a template word ("an image of ...").
    """
    ids = [int(t) for t in token_ids]
    roles = ["other"] * len(ids)
    for i, token in enumerate(ids):
        if token in (tokenizer.sot_token_id, tokenizer.eot_token_id):
            roles[i] = "start/end"
    for bit, attribute in enumerate(MENTION_ORDER):
        if not mention >> bit & 1:
            continue
        run = tokenizer.encode(names[attribute])
        for i in range(len(ids) - len(run) + 1):
            span = range(i, i + len(run))
            if ids[i : i + len(run)] == run and all(roles[j] == "other" for j in span):
                for j in span:
                    roles[j] = attribute
                break
    return roles
