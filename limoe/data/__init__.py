"""Datasets and datamodules: the embedded shapes data and open_clip's file formats."""

from limoe.data.datamodule import ImageTextDataModule, PairDataModule, ShapesDataModule
from limoe.data.shapes import ShapesDataset, export_csv, zeroshot_tasks
from limoe.eval.plan import ZeroShotTask

__all__ = [
    "ImageTextDataModule",
    "PairDataModule",
    "ShapesDataModule",
    "ShapesDataset",
    "ZeroShotTask",
    "export_csv",
    "zeroshot_tasks",
]
