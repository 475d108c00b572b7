"""The training backends, one module each (cpu, mlx, unsloth), chosen by name through
:mod:`edge_tune.training.registry`, and the helpers only they use."""
