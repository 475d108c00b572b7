"""Converters that call other tools: llama.cpp's quantizer and HF->GGUF script, Ollama, vLLM."""
