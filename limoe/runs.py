"""What a finished run records in ``metrics.json``: its arm, its metrics and its config.

One JSON object: ``arm`` (the model config it was composed with, the group ``limoe-compare``
puts it in), the flat ``stage/name`` metrics as floats (``test/shape_zeroshot_top1``, ...) and
``config`` (the resolved run config). So a run directory describes itself without Hydra's
side files, and ``json.load(f)["test/image_to_text_R@1"]`` reads a metric directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

RECORD_KEYS = ("arm", "config")  # the entries of metrics.json that are not metrics


@dataclass
class RunRecord:
    metrics: dict[str, float]
    arm: str | None = None
    config: dict = field(default_factory=dict)


def write_metrics(
    path: str | Path,
    metrics: Mapping[str, float],
    arm: str | None = None,
    config: dict | None = None,
) -> dict[str, float]:
    """Write ``metrics.json``; returns the metrics as floats, sorted by key."""
    flat = {k: float(v) for k, v in sorted(metrics.items())}
    record: dict = {"arm": arm} if arm else {}
    record.update(flat)
    if config:
        record["config"] = config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return flat


def read_metrics(path: str | Path) -> RunRecord:
    """The record of a ``metrics.json``; an empty one where the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return RunRecord({})
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a metrics.json that limoe wrote: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a metrics.json that limoe wrote: not a JSON object")
    metrics = {k: float(v) for k, v in record.items() if k not in RECORD_KEYS}
    return RunRecord(metrics, record.get("arm"), record.get("config") or {})
