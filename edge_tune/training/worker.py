"""The training subprocess: ``python -m edge_tune.training.worker JOB.json``.

Training runs in its own process so that a backend may patch libraries on import (Unsloth
does), a cancel really stops it (the parent kills the process group), and a crash cannot take
the front end down. Events go to the original stdout as JSON lines; everything libraries print
is sent to stderr, which the parent keeps in ``train.log``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path

from edge_tune.training.job import TrainJob, WorkerResult
from edge_tune.errors import DataError, EdgeTuneError, ExitCode
from edge_tune.events import Done, Failed, Log, Progress, to_json


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun; absent for one process


def _event_stream(rank: int = 0):
    # Keep a private handle on the real stdout, then point fd 1 at stderr so that C libraries
    # and print() cannot corrupt the event stream.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event) -> None:
        if rank != 0 and not isinstance(event, Failed):
            # Under torchrun every rank shares the stream: only rank 0 reports progress;
            # the others' events go to train.log, except their failure (one short line).
            print(to_json(event), file=sys.stderr, flush=True)
            return
        if rank != 0:
            event = Failed(f"rank {rank}: {event.message}", event.exit_code)
        out.write(to_json(event) + "\n")
        out.flush()

    return emit


def _join_process_group(backend: str = "cpu") -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL with one GPU per rank
    for a CUDA backend, gloo on CPU; returns the world size."""
    from edge_tune.training.registry import capabilities

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch
        import torch.distributed as dist

        if capabilities(backend).device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return world


def _preference_example(tok, record: dict, system_mode: str, kto: bool) -> list | None:
    """A preference pair (DPO/ORPO: both sides, answers trained) or, with ``kto``, a KTO
    record as one example; None for any other record."""
    from edge_tune.data.preference import encode_kto, encode_pair

    kw = {"tools": record.get("tools"), "system_mode": system_mode,
          "where": record.get("where", "")}
    if "rejected" in record:
        return [encode_pair(tok, record["messages"], record["rejected"], **kw)]
    if kto and "label" in record:
        return [encode_kto(tok, record["messages"], record["label"], **kw)]
    return None


def tokenize_records(tok, records: list, seq_len: int, emit, name: str, train_on_all=False,
                     overflow: str = "truncate", kept: list | None = None,
                     skip_invalid: bool = False, system_mode: str = "keep", kto: bool = False):
    """Examples cut to ``seq_len`` (or dropped, with ``overflow="drop"``); ones with nothing
    left to learn are dropped too. Both are counted and reported. A record may give several
    examples (one per assistant turn, for templates that rewrite earlier turns). ``kept``:
    gets the position in ``records`` of each example returned. A record the chat template
    cannot train stops with its ``FILE:LINE``, or with ``skip_invalid`` is skipped and listed.
    ``kto``: records with a ``label`` become ``KTOExample`` (``--method kto``)."""
    from edge_tune.data.preference import KTOExample, PairExample
    from edge_tune.data.template import Example, RecordError, encode_examples

    examples, truncated, n_examples, bad, untrained = [], 0, 0, [], 0
    for i, record in enumerate(records):
        try:
            encoded = _preference_example(tok, record, system_mode, kto)
            if encoded is None:
                encoded = encode_examples(tok, record.get("messages"), record.get("text"),
                                          tools=record.get("tools"), train_on_all=train_on_all,
                                          system_mode=system_mode, where=record.get("where", ""))
        except RecordError as exc:
            if not skip_invalid:
                raise
            bad.append(str(exc))
            encoded = []
        for full in encoded:
            if not full.n_trained:  # every assistant turn at weight 0
                untrained += 1
                continue
            n_examples += 1
            pair = isinstance(full, (PairExample, KTOExample))
            too_long = (full.longest if pair else len(full.input_ids)) > seq_len
            truncated += too_long
            if too_long and overflow == "drop":
                continue
            ex = full.cut(seq_len) if pair else Example(full.input_ids[:seq_len],
                                                        full.labels[:seq_len])
            if ex.n_trained:
                examples.append(ex)
                if kept is not None:
                    kept.append(i)
        if i % 50 == 0 or i == len(records) - 1:
            emit(Progress(f"tokenize-{name}", i + 1, len(records), "records",
                          f"tokenizing {name} data"))
    if bad and not n_examples:
        raise DataError(f"{name} data: every record was invalid for the chat template; "
                        f"first: {bad[0]}")
    if bad:
        emit(Log(f"{name} data: skipped {len(bad)} records the chat template cannot train "
                 f"(--skip-invalid): {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
                 "warning"))
    if untrained:
        emit(Log(f"{name} data: dropped {untrained} examples with no trained token (every "
                 "assistant turn at weight 0)", "warning"))
    if truncated:
        dropped = n_examples - len(examples)
        what = "dropped (--overflow drop)" if overflow == "drop" else \
            f"truncated ({dropped} of them lost every trained token and were dropped)"
        were = "example was" if truncated == 1 else "examples were"
        emit(Log(f"{name} data: {truncated} {were} longer than seq_len={seq_len} and "
                 f"{'was' if truncated == 1 else 'were'} {what}", "warning"))
    return examples


def read_shard(job: TrainJob, rank: int, world: int) -> list[int]:
    """Put this rank's training records in ``job.records``; returns their indices in the
    training data. One process keeps them all; under torchrun a rank reads only the lines of
    its slots from the records file (see :mod:`edge_tune.data.sharding`)."""
    from edge_tune.training.loop import grad_accum
    from edge_tune.data import sharding

    if world == 1 and job.records is not None:
        return list(range(len(job.records)))
    accum = grad_accum(job.config)
    slots, owned = accum * world, sharding.rank_slots(rank, accum)
    records, indices = [], []
    with open(job.records_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if sharding.slot_of(i, slots) in owned:
                records.append(json.loads(line))
                indices.append(i)
    job.records = records
    return indices


def prepare_examples(job: TrainJob, emit, rank: int = 0, world: int = 1):
    """Tokenize this rank's training records (and, on rank 0, the validation records) with
    the model's chat template. Sets ``job.example_index`` (each example's record index),
    ``job.replay_examples`` and ``job.val_examples``; returns (examples, pad id, tokenizer info)."""
    from transformers import AutoTokenizer

    cfg = job.config
    tok = AutoTokenizer.from_pretrained(job.hf_dir)
    if job.chat_template:  # --chat-template: replaces the model's own, if any
        tok.chat_template = job.chat_template
    seq_len = cfg.seq_len
    on_all = cfg.train_on == "all"
    overflow = cfg.overflow
    per_record = {"skip_invalid": cfg.skip_invalid, "system_mode": cfg.system_mode or "keep",
                  "kto": cfg.method == "kto"}
    indices, kept = read_shard(job, rank, world), []
    examples = tokenize_records(tok, job.records, seq_len, emit, "training", on_all,
                                overflow, kept, **per_record)
    job.example_index = [indices[k] for k in kept]
    job.replay_examples = [k for k, i in enumerate(kept) if job.records[i].get("replay")]
    if not examples:
        shard = f" in rank {rank}'s shard" if world > 1 else ""
        raise DataError(f"no example{shard} has an assistant token within seq_len; raise "
                        "--seq-len" + (" or use fewer processes" if world > 1 else ""))
    # Only rank 0 validates.
    job.val_examples = tokenize_records(tok, job.val_records or [], seq_len, emit,
                                        "validation", on_all, overflow,
                                        **per_record) if rank == 0 else []
    check_token_ids(tok, examples + job.val_examples, Path(job.hf_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    info = {"chat_template": tok.chat_template,
            "stop_tokens": [t for t in {tok.eos_token} if t]}
    return examples, int(pad or 0), info


def check_token_ids(tok, examples: list, hf_dir: Path) -> None:
    """Raise EdgeTuneError when a token id in ``examples`` has no row in the model's embedding
    (``vocab_size`` in ``hf_dir/config.json``): the tokenizer has more tokens than the model,
    and training would stop at the first such id with an IndexError."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # the model loader says what is wrong with it
    vocab = (config.get("text_config") or config).get("vocab_size")
    top = max((max(e.input_ids) for e in examples if e.input_ids), default=-1)
    if not isinstance(vocab, int) or top < vocab:
        return
    raise DataError(
    f"{hf_dir / 'config.json'}: vocab_size: {vocab} is smaller than the tokenizer: the "
    f"data has token id {top} ({tok.convert_ids_to_tokens(top)!r}) and the tokenizer "
    f"has {len(tok)} tokens (expected every token id below vocab_size: a tokenizer "
    "that matches the model's embedding)")


def peak_rss_bytes() -> int:
    """The training process's high-water resident memory in bytes (what the planner
    predicts). Linux: ``VmHWM`` of this address space; ``ru_maxrss`` would also carry the
    forking parent's peak across exec (a TUI or notebook with a model loaded)."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB else


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def run(job: TrainJob | Mapping, emit) -> WorkerResult:
    """Prepare the job's data and run its backend (see :class:`registry.TrainFn`); returns
    its result with the worker's fields filled in. ``job``: as read from the job file (a
    mapping: see ``TrainJob.of``)."""
    import dataclasses

    from edge_tune.training import lora_targets
    from edge_tune.training.registry import load_entry, preload

    job = TrainJob.of(job)
    preload(job.backend)  # before anything imports transformers (Unsloth patches it)
    from edge_tune.training.checkpoint import checkpoint_kept
    from edge_tune.fsutil import atomic_path, disk_full_says
    from edge_tune.models import hf_dir_for

    world, rank = _join_process_group(job.backend), _rank()
    if world > 1 and rank != 0:
        _barrier()  # rank 0 makes the cached HF copy first; the others then only read it
    job.hf_dir = str(hf_dir_for(job.model_ref, emit, job.base_sha256))
    if world > 1 and rank == 0:
        _barrier()
    # --target-modules against the model's own layer names, before any weight loads
    if not job.config.full:
        targets = lora_targets.for_model(Path(job.hf_dir), job.config.target_modules)
        job.config = dataclasses.replace(job.config, target_modules=targets)
        emit(Log(lora_targets.summary(lora_targets.weight_shapes(Path(job.hf_dir)), targets)))
    if job.config.method == "grpo":  # prompts, rendered for generation
        from edge_tune.training.backends.cpu_grpo import prepare_prompts

        job.examples, job.pad_id, tokenizer_info = prepare_prompts(job, emit)
    else:
        job.examples, job.pad_id, tokenizer_info = prepare_examples(job, emit, rank, world)
    val = f", {len(job.val_examples)} validation examples" if job.val_examples else ""
    shard = f" in rank {rank}'s shard" if world > 1 else ""
    emit(Log(f"{len(job.examples)} training examples{shard}{val}"))
    train = load_entry(job.backend)
    if job.config.method == "grpo":  # the cpu backend's GRPO loop (registry refuses others)
        from edge_tune.training.backends.cpu_grpo import train_grpo as train
    def whole(result: WorkerResult) -> WorkerResult:
        return dataclasses.replace(
            result, examples=len(job.examples) if result.examples is None else result.examples,
            hf_dir=job.hf_dir,
            target_modules=None if job.config.full else list(job.config.target_modules),
            peak_rss_bytes=peak_rss_bytes(), tokenizer=tokenizer_info)

    if rank != 0:  # only rank 0 writes the run directory
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edge-tune-rank-") as tmp:
            job.adapter_dir = tmp
            result = whole(train(job, emit))
    else:
        # a full run saves the whole model (HF weights) where a LoRA run saves its adapter.
        # The result goes inside, so the folder alone lets `train --resume` / `export`
        # finish a run whose later steps (GGUF, manifest) failed.
        final = Path(job.run_dir) / ("model" if job.config.full else "adapter")
        with disk_full_says(final, lambda: checkpoint_kept(Path(job.run_dir))), \
                atomic_path(final) as tmp:
            job.adapter_dir = str(tmp)
            result = whole(train(job, emit))
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / TRAINING_RESULT).write_text(json.dumps(
                {**result.to_dict(), "backend": job.backend}))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


TRAINING_RESULT = "training_result.json"  # in RUN/adapter (RUN/model): what training returned


def main(argv: list[str]) -> int:
    from edge_tune.training.checkpoint import Interrupt

    emit = _event_stream(_rank())
    interrupt = Interrupt().install()  # cancel = SIGTERM: the backend saves a checkpoint
    try:
        job = TrainJob.from_json(Path(argv[0]).read_text(), argv[0])
        job.interrupt = interrupt
        result = run(job, emit)
    except EdgeTuneError as exc:
        emit(Failed(str(exc), exc.exit_code))
        return exc.exit_code
    except KeyboardInterrupt:
        emit(Failed("training cancelled", ExitCode.CANCELLED))
        return ExitCode.CANCELLED
    except Exception as exc:  # a bug: keep the traceback in train.log, one line for the user
        try:
            traceback.print_exc()
        except OSError:  # train.log is on the disk that is full
            pass
        from edge_tune.training.checkpoint import checkpoint_kept
        from edge_tune.fsutil import is_disk_full

        if is_disk_full(exc):  # a write no `disk_full_says` named: still one line
            run_dir = Path(json.loads(Path(argv[0]).read_text()).get("run_dir", "."))
            emit(Failed(f"{run_dir}: no space left on device while training; "
                        f"{checkpoint_kept(run_dir)}", ExitCode.BAD_INPUT))
            return ExitCode.BAD_INPUT
        emit(Failed(f"training failed: {type(exc).__name__}: {exc} (see train.log)",
                    ExitCode.FAILED))
        return ExitCode.FAILED
    emit(Done("train", result.to_dict()))  # JSON over the pipe: runner reads it back
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
