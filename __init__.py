"""trident: a Megatron-style 3D-parallel training engine for decoder-only language models.

Subpackages, in import order (see DESIGN.md): ``parallel`` (process groups and the
tensor-parallel building blocks), ``model`` (the transformer), ``data`` (tokenizers and
indexed datasets), ``training`` (the step, optimizer, schedules, checkpoints) and
``tools`` (the ``trident`` command).
"""

__version__ = "0.1.0"
