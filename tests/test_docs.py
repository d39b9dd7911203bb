"""docs/configuration.md against the YAML it describes: every default it states is the
composed config's, and every key a user sets has a row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from limoe.config import compose_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
# The page's sections and the config each one documents (heading fragment -> name, overrides).
SECTIONS = {
    "`limoe-train`": ("train", ()), "`size`": ("train", ()), "`model=limoe`": ("train", ()),
    "`model.moe`": ("train", ()), "`data=scenes`": ("train", ()),
    "`data=shapes`": ("train", ("data=shapes",)), "`data=csv`": ("train", ("data=csv",)),
    "`data=tabler`": ("train", ("data=tabler",)),
    "`data=openclipart`": ("train", ("data=openclipart",)), "`trainer`": ("train", ()),
    "`callbacks`": ("train", ()), "`paths`": ("train", ()), "`limoe-eval`": ("eval", ()),
    "`limoe-analyze`": ("analyze", ()), "`limoe-export`": ("export", ()),
    "`limoe-bench`": ("bench", ()),
}  # fmt: skip
# Keys left to the libraries' own documentation (Lightning's callbacks and loggers take them
# as they are) or that are entries of a documented mapping.
UNDOCUMENTED = ("_target_", "_convert_", "_partial_", "logger.", "callbacks.model_checkpoint.",
                "callbacks.last_checkpoint.", "callbacks.routing_history.dirpath",
                "cost.against.", "gpu.train.models.")  # fmt: skip


def _rows() -> list[tuple[str, tuple[str, tuple], str, str]]:
    """(key, section config, stated default, line) of every table row naming keys."""
    rows, section = [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            section = next((v for k, v in SECTIONS.items() if k in line), None)
            continue
        cells = line.split(" | ")
        if section is None or not line.startswith("| `") or len(cells) < 3:
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        # `.mode` after `callbacks.model_checkpoint.monitor`: a key beside the previous one
        keys = [k if not k.startswith(".") else keys[0].rsplit(".", 1)[0] + k for k in keys]
        values = re.findall(r"`([^`]*)`", cells[1])
        if len(keys) == len(values):
            rows += [(k, section, v, line) for k, v in zip(keys, values)]
    return rows


def _config(section: tuple[str, tuple]) -> dict:
    name, overrides = section
    return OmegaConf.to_container(compose_config(name, list(overrides)), resolve=False)


def _lookup(node: dict, key: str):
    for part in key.split("."):
        node = node[part]
    return node


def test_every_stated_default_is_the_configs():
    configs, checked = {}, 0
    for key, section, stated, line in _rows():
        if key.endswith(".*") or "..." in stated:
            continue  # a group of keys, or a value shortened on the page
        config = configs.setdefault(section, _config(section))
        try:
            value = _lookup(config, key)
        except (KeyError, TypeError):
            pytest.fail(f"docs/configuration.md names {key}, which conf/ does not have: {line}")
        if isinstance(value, dict):
            continue  # a group, named by its option
        assert yaml.safe_load(stated) == value or stated == str(value), (key, stated, value)
        checked += 1
    assert checked > 150


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("name", ["train", "eval", "analyze", "export", "bench"])
def test_every_key_has_a_row(name):
    text = DOC.read_text()
    groups = tuple(f"{g}." for g in re.findall(r"`([\w.]+)\.\*`", text))  # `layer.moe.*`
    keys = _leaves(_config((name, ())))
    missing = [k for k in keys if f"`{k}`" not in text and not k.startswith(UNDOCUMENTED)
               and not k.endswith(UNDOCUMENTED) and not k.startswith(groups)]  # fmt: skip
    assert not missing, f"docs/configuration.md has no row for {missing}"
