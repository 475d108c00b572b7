"""``edge-tune eval``: the scorers on hand-made cases, then real evaluations in llama.cpp.

The tiny run is a random Llama (hidden 64, 2 blocks) with the embedded model's tokenizer,
trained 8 steps: its numbers mean nothing as quality, but they must be the numbers training
measured (same tokens, same loss) and have the shape the CLI promises. The demo run (slow) is
the default model taught to answer like a pirate: there the tuned model must beat the base.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from edge_tune.eval import scores as es
from tests.helpers.cli import assert_one_line_error, run_cli

TWO_GENERAL = ["What is the capital of France?", "List the first five prime numbers."]


@pytest.fixture(autouse=True, scope="module")
def one_llama_thread():
    """llama.cpp with one thread (here and in subprocesses): on a shared machine its threads
    wait for each other at every op (see edge_tune.llama.engine)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_TUNE_THREADS", "1")
        yield


# --- scorers ----------------------------------------------------------------------------------

def test_exact_match_normalizes_case_space_and_width():
    assert es.exact_match("  Paris ", "paris") == 1.0
    assert es.exact_match("The  answer\nis 42", "the answer is 42") == 1.0
    assert es.exact_match("ＡＢＣ", "abc") == 1.0  # NFKC: full-width letters
    assert es.exact_match("Paris.", "Paris") == 0.0
    assert es.exact_match("", "") == 1.0


def test_contains():
    assert es.contains("I think the capital is Paris, France.", "paris") == 1.0
    assert es.contains("Lyon", "Paris") == 0.0
    assert es.contains("anything", "  ") == 0.0  # an empty reference matches nothing


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: R = 5/6, P = 5/5, F = 10/11.
    assert es.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    # Lin 2004's example: S2 "police kill the gunman" vs S1 "police killed the gunman"
    # (LCS 3 of 4 both ways: F = 0.75).
    assert es.rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # Order matters (subsequence, not bag of words): "the gunman kill police" has LCS 2.
    assert es.rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    assert es.rouge_l("Arr, matey!", "arr matey") == 1.0  # punctuation and case are not tokens
    assert es.rouge_l("", "something") == 0.0 and es.rouge_l("x", "") == 0.0
    assert es.rouge_l("totally different", "nothing shared") == 0.0
    assert es.rouge_tokens("Ça va, 東京 _x2") == ["ça", "va", "東京", "x2"]


def test_rouge_l_matches_the_lcs_definition_on_random_strings():
    import random

    rng = random.Random(0)
    for _ in range(50):
        a = [rng.choice("abcd") for _ in range(rng.randint(1, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(1, 8))]
        # LCS by brute force over a's subsequences
        from itertools import combinations

        def is_sub(seq, of):
            it = iter(of)
            return all(x in it for x in seq)

        best = max((k for k in range(len(a) + 1) for c in combinations(a, k) if is_sub(c, b)),
                   default=0)
        assert es.lcs_length(a, b) == best


def test_json_scored_only_where_the_reference_is_json():
    ref = '{"name": "Ada", "age": 36}'
    assert es.reference_is_json(ref) and es.reference_is_json("[1, 2]")
    assert not es.reference_is_json("42") and not es.reference_is_json("{not json")
    assert es.score_answer('{"name": "Ada"}', ref).json_valid == 1.0
    assert es.score_answer('```json\n{"name": "Ada", "age": 36}\n```', ref).json_valid == 1.0
    assert es.score_answer('{"name": "Ada", age: 36}', ref).json_valid == 0.0
    assert es.score_answer("Sure! Here it is: {}", ref).json_valid == 0.0
    assert es.score_answer("Paris", "Paris").json_valid is None


def test_mean_scores_skip_what_does_not_apply():
    scores = [es.score_answer("Paris", "Paris"), es.score_answer("{}", '{"a": 1}')]
    means = es.mean_scores(scores)
    assert means["exact"] == 0.5 and means["json_valid"] == 1.0
    assert es.mean_scores([])["rouge_l"] is None
    assert es.perplexity(0.0) == 1.0 and es.perplexity(1e6) == math.inf


# --- a tiny run in llama.cpp ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, default_gguf, demo_jsonl):
    from edge_tune import api
    from edge_tune.config import build
    from tests.helpers.tiny_models import tiny_llama_gguf

    root = tmp_path_factory.mktemp("eval-tiny")
    model = tiny_llama_gguf(root / "tiny.gguf", default_gguf)
    cfg = build(None, data=str(demo_jsonl), out=str(root / "run"), model=str(model),
                max_steps=8, batch_size=2, seq_len=64, lr=2e-3, rank=4, alpha=8, seed=3,
                val_split=0.02, verify=False)
    return api.train(cfg).run_dir


def test_eval_on_a_tiny_run_measures_what_training_measured(tiny_run):
    from edge_tune.commands.eval import evaluate

    r = evaluate(tiny_run, max_tokens=4, drift_set=TWO_GENERAL)
    man = json.loads((tiny_run / "manifest.json").read_text())
    assert r.n_records == man["data"]["val_records"] == 4  # the run's --val-split share
    assert r.n_examples == 4 and r.n_tokens > 20 and r.n_answers == 4
    # Same tokens, same loss: llama.cpp's tuned loss is training's validation loss (F32 model).
    assert r.loss["tuned"] == pytest.approx(man["result"]["val_loss"], rel=0.02)
    assert r.loss["base"] != r.loss["tuned"]
    for side in ("base", "tuned"):
        assert r.perplexity[side] == pytest.approx(math.exp(r.loss[side]))
        assert set(r.scores[side]) == {"exact", "contains", "rouge_l", "json_valid"}
        assert 0.0 <= r.scores[side]["rouge_l"] <= 1.0
    d = r.drift
    assert d["n_prompts"] == 2 and d["n_positions"] > 0
    assert d["mean_kl"] > 0.0 and 0.0 <= d["changed_share"] <= 1.0
    assert 0.0 <= d["changed_beyond_ties"] <= d["changed_share"]
    for p in d["prompts"]:  # a tie is a changed answer; an unchanged one has no parting gap
        assert p["changed"] or (not p["changed_at_tie"] and p["divergence_gap"] is None)
    assert [p["prompt"] for p in d["prompts"]] == TWO_GENERAL


def test_a_merged_export_evaluates_like_base_plus_adapter(tiny_run, tmp_path):
    """``--merged``: the F32 merge of the adapter is the same model as base + adapter, so the
    numbers are the same (up to float rounding)."""
    from edge_tune import api
    from edge_tune.commands.eval import evaluate

    merged = tmp_path / "merged-f32.gguf"
    api.export(tiny_run, merge=True, quant="F32", out=merged)
    kw = dict(n_prompts=2, max_tokens=3, drift_set=TWO_GENERAL[:1])
    adapter, whole = evaluate(tiny_run, **kw), evaluate(tiny_run, merged=merged, **kw)
    assert whole.tuned == str(merged) and adapter.tuned.endswith("adapter.gguf")
    assert whole.loss["base"] == adapter.loss["base"]
    assert whole.loss["tuned"] == pytest.approx(adapter.loss["tuned"], rel=1e-3)
    assert whole.drift["mean_kl"] == pytest.approx(adapter.drift["mean_kl"], rel=0.05, abs=1e-4)


def test_eval_json_shape_through_the_cli(tiny_run, monkeypatch):
    from typer.testing import CliRunner

    from edge_tune import cli
    from edge_tune.commands import eval as eval_mod

    monkeypatch.setattr(eval_mod, "drift_prompts", lambda: TWO_GENERAL[:1])
    res = CliRunner().invoke(cli.app, ["eval", str(tiny_run), "--json", "-n", "2",
                                       "--max-tokens", "3"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"run", "base", "tuned", "data", "n_records", "n_examples", "n_tokens", "loss",
            "perplexity", "scores", "n_answers", "max_tokens", "drift", "answers",
            "training_val_loss"} <= set(report)
    assert report["n_records"] == 2 and report["max_tokens"] == 3
    assert set(report["loss"]) == {"base", "tuned"}
    row = report["answers"][0]
    assert {"prompt", "reference", "base", "tuned", "base_scores", "tuned_scores"} <= set(row)
    assert report["drift"]["n_prompts"] == 1


def test_bad_input_is_one_line_exit_2(tiny_run, tmp_path):
    assert_one_line_error(run_cli("eval", str(tmp_path / "nope")), "no such run directory")
    assert_one_line_error(run_cli("eval", str(tiny_run), "--max-tokens", "0"), "--max-tokens 0")
    assert_one_line_error(run_cli("eval", str(tiny_run), "--data", str(tmp_path / "x.jsonl")),
                          "--data", "no such file")
    no_val = tmp_path / "no-val"
    shutil.copytree(tiny_run, no_val)
    man = json.loads((no_val / "manifest.json").read_text())
    man["hyperparameters"]["val_split"] = 0.0
    (no_val / "manifest.json").write_text(json.dumps(man))
    assert_one_line_error(run_cli("eval", str(no_val)), "held no data back", "--data FILE")


def test_tui_adapters_screen_evaluates_the_selected_run(tiny_run, monkeypatch):
    """The Adapters screen's "a" key runs eval on the selected run and shows the summary."""
    pytest.importorskip("textual")
    import asyncio

    from textual.widgets import DataTable, RichLog

    from edge_tune.commands import eval as eval_mod
    from edge_tune.tui.app import EdgeTuneApp
    from tests.helpers.pilot import log_text, until

    monkeypatch.setattr(eval_mod, "drift_prompts", lambda: TWO_GENERAL[:1])
    app = EdgeTuneApp(runs_root=tiny_run.parent)

    async def scenario(pilot):
        await pilot.press("f4")
        table = pilot.app.screen.query_one("#runs", DataTable)
        await until(pilot, lambda: table.row_count == 1, 60, "runs table")
        actions = pilot.app.screen.query_one("#actions", RichLog)
        await pilot.press("a")
        await until(pilot, lambda: "drift:" in log_text(actions) or "error:" in
                    log_text(actions), 600, "eval")
        shown = log_text(actions)
        assert "held-out examples: loss" in shown and "ROUGE-L" in shown, shown
        assert "mean KL(base||tuned)" in shown and "1 general prompts" in shown, shown

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def test_tui_eval_takes_held_out_data_from_its_field(tiny_run, tmp_path, monkeypatch):
    """A run that held nothing back (--val-split 0): "a" on the Adapters screen fails with the
    core's one line, the eval data field takes the focus and says what to give; a file typed
    there (enter) is evaluated on."""
    pytest.importorskip("textual")
    import asyncio

    from textual.widgets import DataTable, Input, RichLog

    from edge_tune.commands import eval as eval_mod
    from edge_tune.tui.app import EdgeTuneApp
    from tests.helpers.pilot import log_text, until

    monkeypatch.setattr(eval_mod, "drift_prompts", lambda: TWO_GENERAL[:1])
    runs = tmp_path / "runs"
    no_val = runs / "no-val"
    shutil.copytree(tiny_run, no_val)
    man = json.loads((no_val / "manifest.json").read_text())
    man["hyperparameters"]["val_split"] = 0.0
    (no_val / "manifest.json").write_text(json.dumps(man))
    held_out = tmp_path / "held-out.jsonl"  # two records the tiny run did not train on
    held_out.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in (("Name a red fruit.", "Arr, an apple!"), ("Two plus two?", "Four, matey."))))
    app = EdgeTuneApp(runs_root=runs)

    async def scenario(pilot):
        await pilot.press("f4")
        screen = pilot.app.screen
        table = screen.query_one("#runs", DataTable)
        await until(pilot, lambda: table.row_count == 1, 60, "runs table")
        actions = screen.query_one("#actions", RichLog)
        await pilot.press("a")
        await until(pilot, lambda: "error:" in log_text(actions), 120, "the refusal")
        await pilot.pause()
        said = " ".join(log_text(actions).split())  # the log wraps at the screen's width
        assert "held no data back" in said and "'eval data' field" in said, said
        field = screen.query_one("#eval-data", Input)
        assert pilot.app.focused is field
        field.value = str(held_out)
        await pilot.press("enter")
        await until(pilot, lambda: "drift:" in log_text(actions), 600, "eval")
        said = " ".join(log_text(actions).split())
        assert "eval on 2 held-out examples: loss" in said, said

    async def main():
        async with app.run_test(size=(80, 24)) as pilot:
            await scenario(pilot)

    asyncio.run(main())


# --- the demo run (default model) ----------------------------------------------------------------

@pytest.mark.slow
def test_eval_on_the_demo_run_tuned_beats_base_and_drift_is_printed(default_model_run):
    """The session's demo run (default model taught to answer like a pirate) on the demo
    records its --val-split held back: the tuned model's loss on them is lower, its answers are
    closer to the references than the base's, and the drift figure is printed."""
    from rich.console import Console

    from edge_tune.render.eval import render_eval

    run, _ = default_model_run
    proc = run_cli("eval", str(run), "-n", "8", "--max-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["n_records"] == r["n_answers"] == 8 and "--val-split 0.1" in r["data"]
    assert r["loss"]["tuned"] < r["loss"]["base"] - 0.3
    assert r["scores"]["tuned"]["rouge_l"] > r["scores"]["base"]["rouge_l"] + 0.05
    assert sum(a["tuned"].startswith("Arr") for a in r["answers"]) >= 6
    assert sum(a["base"].startswith("Arr") for a in r["answers"]) == 0
    assert r["drift"]["n_prompts"] == 20 and r["drift"]["mean_kl"] > 0
    console = Console(record=True, width=160)
    render_eval(r, console)
    shown = console.export_text()
    assert "drift on 20 general prompts: mean KL(base‖tuned)" in shown
    assert "ROUGE-L F" in shown and "held-out loss" in shown
