"""The core: one expert's config, LoRA layers, the expert bank, routing types and storage.

Nothing here imports :mod:`moe_lora.routers`, :mod:`moe_lora.memory` or :mod:`moe_lora.continual`
(``tests/test_layering.py`` checks it).
"""
