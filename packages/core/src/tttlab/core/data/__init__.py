"""Datasets as uint8 NHWC numpy arrays with int64 labels, lazily read."""

from ._base import ArrayDataset, FileDataset, ImageDataset, resize_center_crop

__all__ = ["ArrayDataset", "FileDataset", "ImageDataset", "resize_center_crop"]
