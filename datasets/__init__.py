"""Datasets, one file per family, registered by their CLI name (`seq-digits`, `seq-cifar10`, ...)."""
from utils.continual_dataset import ContinualDataset
from utils.registry import Registry

DATASETS: Registry[ContinualDataset] = Registry("dataset", "datasets")
register_dataset = DATASETS.register
