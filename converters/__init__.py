"""Adapter and model format converters (installed as ``edge_tune.converters``).

:mod:`.formats` is the pure format layer (numpy, ``gguf``, safetensors); :mod:`.integrations`
holds what calls another tool (llama.cpp's quantizer and converter script, Ollama, vLLM).
"""
