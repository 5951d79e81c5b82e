"""Single-device Mixtral: config and presets, the model, HF conversion, FLOP counting."""

from .config import PRESETS, ModelConfig, model_config, validate_model_config
from .flops import active_params, flops_per_token, mfu, total_params
from .hf import export_hf, from_hf, hf_config, import_hf, model_config_from_hf, to_hf
from .mixtral import Mixtral
from .moe import RouterStats, load_balancing_loss, router_z_loss

__all__ = ["PRESETS", "ModelConfig", "Mixtral", "RouterStats", "active_params", "export_hf",
           "flops_per_token", "from_hf", "hf_config", "import_hf", "load_balancing_loss", "mfu",
           "model_config", "model_config_from_hf", "router_z_loss", "to_hf", "total_params",
           "validate_model_config"]
