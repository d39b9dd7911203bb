"""Datasets and datamodules: the embedded shapes dataset (more sources sit beside it)."""

from limoe.data.datamodule import ShapesDataModule
from limoe.data.shapes import ShapesDataset, ZeroShotTask, export_csv, zeroshot_tasks

__all__ = ["ShapesDataModule", "ShapesDataset", "ZeroShotTask", "export_csv", "zeroshot_tasks"]
