"""Exporting a trained adapter or model, shared by the ``export`` and ``train`` commands:
:mod:`~edge_tune.exporting.steps` (adapter GGUF, merged, full, vLLM, Ollama Modelfile) and
:mod:`~edge_tune.exporting.checked` (the check a merged or quantized file passes before it takes
its name)."""
