"""edge-tune: fine-tune a small LLM on your own data and run it offline.

The package root stays light on purpose: importing it must not pull torch, transformers,
peft, llama_cpp, mlx, unsloth or textual (``tests/unit/test_import_hygiene.py`` checks this), so
``edge-tune --help`` is instant and the core imports on any machine. The public API lives in
:mod:`edge_tune.api`.
"""

__version__ = "0.1.0"
