"""Single-device Mixtral: config and presets, the model, HF conversion, FLOP counting."""

from .config import PRESETS, ModelConfig, model_config, validate_model_config
from .mixtral import Mixtral
from .moe import RouterStats, load_balancing_loss, router_z_loss

__all__ = ["PRESETS", "ModelConfig", "Mixtral", "RouterStats", "load_balancing_loss",
           "model_config", "router_z_loss", "validate_model_config"]
