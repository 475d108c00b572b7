"""Training backends, chosen by name through :mod:`edge_tune.backends.registry`."""
