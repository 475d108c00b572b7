"""One module per command of the core (doctor, plan, train, inspect, export, convert, verify,
chat, serve, bundle); :mod:`edge_tune.api` re-exports their public names for front ends."""
