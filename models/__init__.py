"""Continual-learning methods, one file each, registered by their CLI name (`sgd`, `er`, `derpp`, ...)."""
from utils.continual_model import ContinualModel
from utils.registry import Registry

MODELS: Registry[ContinualModel] = Registry("model", "models")
register_model = MODELS.register
