"""Base models: the embedded defaults and any Hugging Face model (:mod:`.loading`), and the
feature backbones the continual engine trains on (:mod:`.backbones`)."""

from moe_lora.models.loading import (
    EMBEDDED_MODELS,
    BaseModel,
    check_model_name,
    default_targets,
    load_base,
    model_cache_dir,
)

__all__ = ["EMBEDDED_MODELS", "BaseModel", "check_model_name", "default_targets", "load_base",
           "model_cache_dir"]
