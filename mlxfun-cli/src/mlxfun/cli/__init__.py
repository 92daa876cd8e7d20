"""The mlxfun command line."""
