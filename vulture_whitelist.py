"""Names vulture (``make lint``: ``vulture ... --min-confidence 80``) takes for unused, that a
framework passes in: each is a parameter of a callback whose signature the caller fixes.
Only parsed by vulture, never imported."""

_.signum  # signal.signal handlers get (signum, frame): training/checkpoint.py, cli.py
_.frame  # the same handlers' second argument
_.comm_group  # mlx_lm.tuner.trainer calls iterate_batches(..., comm_group=...) by keyword
_.num_training_steps  # transformers.Trainer calls create_scheduler(num_training_steps=...)
_.control  # transformers.TrainerCallback events take (args, state, control, **kwargs)
