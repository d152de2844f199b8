"""The shipped configs (*.yaml), installed as the data package dsv4_jax.configs: see dsv4_jax/config/shipped.py."""
