"""mlxfun core: plugin manager, hook specs, shared data types and MLX primitives.

Importing this package does not import MLX; the modules that need it import it themselves.
"""

__version__ = "0.1.0"
