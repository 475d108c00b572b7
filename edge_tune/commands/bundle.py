"""``bundle``: a base and the adapters of some runs (or one run merged) packed into a folder
or .tar.gz for an edge box; the layout is :mod:`edge_tune.bundle`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune.adapters import merge_base, peft_adapter, resolve_chat
from edge_tune.errors import UsageError
from edge_tune.events import EventSink, ignore
from edge_tune.exporting.steps import export_full, export_merged
from edge_tune.fsutil import sha256_file
from edge_tune.templates import choice as template_choice


def bundle(runs: list[str], out: Path, base: Optional[str] = None, merged: bool = False,
           quant: Optional[str] = None, on_event: EventSink = ignore,
           chat_template: Optional[str] = None, wheels: bool = True) -> Path:
    """Pack a base and the adapters of ``runs`` (``RUN`` or ``NAME=RUN``) into a folder or
    .tar.gz for an edge box; with ``merged``, one run merged into the base instead (checked
    as ``export --merge`` checks it: a merge that fails is refused, CheckFailed, and nothing
    is written). Each adapter is served with its run's chat template; ``chat_template``
    replaces them all. ``wheels``: carry ``wheels/`` and ``install.sh`` for an offline
    install (:func:`edge_tune.bundle.build_wheelhouse`)."""
    import tempfile

    from edge_tune import bundle as bundle_mod
    from edge_tune.converters.formats.base_info import from_gguf
    from edge_tune.converters.formats.validate import validate_adapter_file

    if not runs:
        raise UsageError("bundle: name at least one run directory or adapter .gguf")
    bundle_mod.check_output(Path(out))  # before a merge spends minutes
    if merged and len(runs) != 1:
        raise UsageError("merges one run into the base; name exactly one RUN",
                         setting="merged")
    items, base_path, base_sha, templates = [], None, None, {}
    forced = template_choice.given(chat_template)
    for arg in runs:
        name, path = bundle_mod.split_run_arg(str(arg))  # the TUI passes Paths
        target = resolve_chat(Path(path), base, chat_template)
        if target.manifest is not None and target.manifest.full:
            if len(runs) != 1:
                raise UsageError(f"bundle: {path} is a full fine-tuning run, a whole model: "
                                 "bundle it alone (a bundle carries one base)")
            return _bundle_full(Path(path), name or bundle_mod.default_name(Path(path)),
                                target, Path(out), quant, forced, on_event, wheels)
        if base_path is None:
            base_path, base_sha = target.base, sha256_file(target.base)
        elif target.base != base_path and sha256_file(target.base) != base_sha:
            raise UsageError(f"bundle: {path} was trained on {target.base}, not on "
                             f"{base_path}; a bundle carries one base")
        items.append((name or bundle_mod.default_name(Path(path)), target.adapter,
                      target.manifest.to_dict() if target.manifest is not None else None))
        if target.chat_template is not None:
            templates[items[-1][0]] = target.chat_template.text
    info = from_gguf(base_path)
    for _, adapter_gguf, _ in items:
        validate_adapter_file(adapter_gguf, info)  # refuse now, not on the edge box
    template = forced.text if forced else template_choice.gguf_chat_template(base_path)
    with tempfile.TemporaryDirectory() as work:
        if merged:
            name, _, man = items[0]
            template = templates.get(name) or template  # the merged model is the run's
            run = Path(bundle_mod.split_run_arg(str(runs[0]))[1])
            peft_dir, run_man = peft_adapter(run)
            # checked as export --merge checks it; a merge that fails leaves nothing
            result = export_merged(run, peft_dir, run_man, merge_base(run_man, base_path),
                                   Path(work) / f"{name}-merged.gguf", quant or "F16", on_event,
                                   verify=True, ollama=None,
                                   template=template_choice.choose(None, run_man),
                                   keep_rejected=False)
            plan = bundle_mod.plan_bundle(result.path, [], template, merged=name)
            if man is not None:
                plan.manifests[name] = man
        else:
            if quant is not None:
                raise UsageError("applies to --merged bundles only", setting="quant")
            plan = bundle_mod.plan_bundle(base_path, items, template, templates=templates)
        return bundle_mod.write_bundle(plan, Path(out), on_event, wheels=wheels)


def _bundle_full(run: Path, name: str, target, out: Path, quant: Optional[str], forced,
                 on_event: EventSink, wheels: bool = True) -> Path:
    """A full fine-tuning run's model as the bundle's base, like a merged run (``quant``:
    converted again from the run's weights at that type)."""
    import tempfile

    from edge_tune import bundle as bundle_mod

    template = (forced or target.chat_template)
    text = template.text if template else template_choice.gguf_chat_template(target.base)
    with tempfile.TemporaryDirectory() as work:
        model = target.base
        if quant is not None:
            model = export_full(run, target.manifest, Path(work) / f"{name}-{quant}.gguf",
                                quant, on_event, keep_rejected=False).path
        plan = bundle_mod.plan_bundle(model, [], text, merged=name)
        plan.manifests[name] = target.manifest.to_dict()
        return bundle_mod.write_bundle(plan, out, on_event, wheels=wheels)
