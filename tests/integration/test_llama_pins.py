"""The llama-cpp-python internals that edge-tune relies on, pinned on a real ``Llama``.

Every private touch is in one class, ``edge_tune.llama.native.SeqLlama`` (its docstring lists
them). Each one is checked here on a model loaded from the tiny test GGUF, by type and by the
behaviour used, so that an upgrade of llama-cpp-python that moves any of them fails here, with
the attribute's name, before the engine or the server misbehave.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest


@pytest.fixture(scope="module")
def plain(tiny):
    """llama-cpp-python's own ``Llama``, as it loads a model."""
    from llama_cpp import Llama

    from edge_tune.native_log import quiet_stderr

    with quiet_stderr():
        llm = Llama(model_path=str(tiny), n_ctx=64, n_threads=1, logits_all=True,
                    verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def seq(tiny):
    """edge-tune's ``SeqLlama``: two sequences of 64 tokens, extra buffer types off."""
    from edge_tune.llama.native import open_llama
    from edge_tune.native_log import quiet_stderr

    with quiet_stderr():
        llm = open_llama(2, 64, extra_bufts=False, model_path=str(tiny), n_threads=1,
                         logits_all=False, verbose=False)
    yield llm
    llm.batch.close()
    llm.close()


def test_the_private_attributes_exist_with_their_types(plain):
    from llama_cpp import _internals

    assert isinstance(plain._ctx, _internals.LlamaContext)
    assert plain._ctx.memory  # the context's llama_memory_t, not NULL
    assert callable(plain._ctx.kv_cache_seq_rm) and callable(plain._ctx.kv_cache_clear)
    assert isinstance(plain._model, _internals.LlamaModel)
    assert plain._model.vocab  # a llama_vocab pointer, not NULL
    assert isinstance(plain._model.token_get_text(plain.token_eos()), str)
    assert isinstance(plain._n_ctx, int) and plain._n_ctx == plain.n_ctx()
    assert isinstance(plain._n_vocab, int) and plain._n_vocab == plain.n_vocab()
    assert plain._logits_all is True
    assert isinstance(plain.scores, np.ndarray) and plain.scores.shape[1] == plain._n_vocab
    assert isinstance(plain.input_ids, np.ndarray) and plain.input_ids.dtype == np.intc
    assert isinstance(plain.n_tokens, int)
    assert isinstance(plain._input_ids, np.ndarray)
    assert plain._input_ids.shape == (plain.n_tokens,)
    assert isinstance(plain._requires_eval, bool)
    assert plain._sampler is None  # built by generate
    assert isinstance(plain._stack, contextlib.ExitStack)


def test_the_methods_and_parameters_relied_on():
    import llama_cpp.llama as llama_module
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    assert "idx" in inspect.signature(Llama.sample).parameters
    assert list(inspect.signature(Llama.generate).parameters)[1] == "tokens"
    # Llama() takes its default parameters from this module, looked up at call time
    assert llama_module.llama_cpp is low
    assert callable(low.llama_model_default_params)
    assert callable(low.llama_context_default_params)


def test_the_parameters_set_while_loading_reach_llama_cpp(seq):
    assert seq.model_params.use_extra_bufts is False
    assert seq.context_params.n_seq_max == 2
    assert seq.context_params.kv_unified is False
    assert seq.sequence_tokens == 64


def test_generate_goes_through_the_instances_eval_and_sample(seq):
    """llama-cpp-python's loop calls ``self.eval``/``self.sample``: the counter sees the
    prompt, every sample, and its cut ends the answer."""
    from edge_tune.llama.engine import _TokenCounter

    prompt = seq.tokenize(b"Hello there", add_bos=False)
    counter = _TokenCounter(seq.vocab, limit=2)
    seq.reset()
    with seq.answering(counter):
        got = []
        for token in seq.generate(prompt, temp=0.0, top_k=1):
            got.append(token)
            if len(got) == 3:
                break
    assert counter.cached_tokens == 0
    assert counter.prompt_tokens == len(prompt)
    assert counter.completion_tokens == 2 and counter.cut
    assert got[2] == counter.stop
    assert seq.counter is None


def test_kv_removals_touch_the_sequences_own_entries_only(seq):
    """``generate`` reuses a cached prefix and removes the KV entries after it through
    ``_ctx``; ``_ctx.kv_cache_clear`` would clear every sequence: edge-tune binds both to the
    sequence, so the neighbour's entries stay."""
    import llama_cpp

    from edge_tune.llama.batch_rows import Rows
    from edge_tune.llama.engine import _TokenCounter

    memory = llama_cpp.llama_get_memory(seq.ctx)
    seq.reset()
    seq.batch.drop(0)
    seq.batch.drop(1)
    seq.batch.decode([Rows(1, 0, list(range(100, 112)))])  # past where seq 0 is cut
    prompt = seq.tokenize(b"One two three four five", add_bos=False)
    assert len(prompt) < 12
    list(zip(range(2), seq.generate(prompt, temp=0.0, top_k=1)))
    assert seq.n_tokens > len(prompt)
    counter = _TokenCounter(seq.vocab)
    with seq.answering(counter, keep_new=2):  # the whole prompt cached, two rows evaluated
        list(zip(range(1), seq.generate(prompt, temp=0.0, top_k=1)))
    assert counter.cached_tokens == len(prompt) - 2
    assert seq.cached_tokens()[:len(prompt)].tolist() == prompt
    assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == 11
    seq.clear_kv()
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == -1
    assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == 11


def test_a_view_shares_the_model_and_context_not_the_tokens(seq):
    from edge_tune.llama.batch_rows import DirectDecoder

    other = seq.view(1, DirectDecoder(seq.batch))
    assert other.ctx == seq.ctx and other.vocab == seq.vocab
    assert other.n_tokens == 0 and other.input_ids is not seq.input_ids
    assert other._ctx._seq == 1 and other._stack is not seq._stack


def test_gbnf_literals_escape_as_the_converter_does():
    from edge_tune.llama.gbnf import literal, schema_converter

    text = 'say "hi"\nthen\r\\leave'
    assert literal(text) == schema_converter()._format_literal(text)
