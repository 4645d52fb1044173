"""Size limits shared by the config, the CLI and the models, in a module that loads nothing heavy."""

from __future__ import annotations

# The most classes any model here has (above ImageNet-21k's 21,841): also the largest number
# of groups a level may ask for.
MAX_CLASSES = 100_000
# model.width and a checkpoint's recorded width: far above any network's base width.
MAX_WIDTH = 1024
