"""Training: the typed job, the subprocess that runs it (:mod:`edge_tune.training.runner` starts
:mod:`edge_tune.training.worker`), what every backend's loop shares, checkpoints, and the
backends themselves (:mod:`edge_tune.training.backends`), chosen by name through
:mod:`edge_tune.training.registry`."""
