"""The continual engine: strategies as classes run task after task by one runner.

Layers inside (each imports only those above it in this list):

- :mod:`.registry` (strategy registry), :mod:`.settings` (typed OmegaConf config);
- :mod:`.metrics` (accuracy matrix, forgetting, BWT/FWT; TP/WP), :mod:`.prepared` (cached
  examples), :mod:`.module` (the Lightning module), :mod:`.evaluation` (predictions);
- :mod:`.strategies` (one class per strategy, on :class:`.strategies.base.Strategy`);
- :mod:`.checkpoint`, :mod:`.results`, :mod:`.console`, :mod:`.runner`.

Importing this package registers the built-in strategies.
"""

import moe_lora.continual.strategies  # noqa: F401  (registers the built-in strategies)
