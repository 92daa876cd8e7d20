"""Built-in mlxfun methods: scorers, selectors, compressors, interventions."""
