"""Built-in MoE architecture adapters (one per mlx-lm architecture family)."""
