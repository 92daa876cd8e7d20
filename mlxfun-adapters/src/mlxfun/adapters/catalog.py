"""The built-in adapters: one declaration per mlx-lm architecture family."""

from . import biased_family, softmax_family, special_family

ADAPTERS = [*softmax_family.ADAPTERS, *biased_family.ADAPTERS, *special_family.ADAPTERS]
