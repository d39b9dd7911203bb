"""Datasets and datamodules: the embedded shapes and scenes data and open_clip's file formats."""

from limoe.data.datamodule import PairDataModule
from limoe.data.embedded import ScenesDataModule, ShapesDataModule
from limoe.data.files import ImageTextDataModule
from limoe.data.scenes import ScenesDataset
from limoe.data.shapes import ShapesDataset, export_csv, zeroshot_tasks
from limoe.eval.plan import ZeroShotTask

__all__ = [
    "ImageTextDataModule",
    "PairDataModule",
    "ScenesDataModule",
    "ScenesDataset",
    "ShapesDataModule",
    "ShapesDataset",
    "ZeroShotTask",
    "export_csv",
    "zeroshot_tasks",
]
