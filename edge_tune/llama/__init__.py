"""llama.cpp (llama-cpp-python) behind one wall: the only package of edge-tune that imports
``llama_cpp`` (the quantizer in ``converters/integrations`` aside: the converters sit below this
package, and the HF -> GGUF conversion quantizes through it).

- :mod:`.engine`: one base model, validated adapters, switching, generation, logits;
- :mod:`.batch_rows`: several sequences in one context, decoded so that batching changes no
  answer;
- :mod:`.serving_copy`: the Q8_0 copy of an adapter that the engine loads;
- :mod:`.speculative`: speculative decoding by prompt lookup (answers unchanged).

llama.cpp's own log is hidden by :mod:`edge_tune.native_log`, a leaf at the root that the
quantizer shares (here it would make ``converters`` and ``llama`` import each other).
Nothing is imported here, so importing a module of this package loads no heavy library.
"""
