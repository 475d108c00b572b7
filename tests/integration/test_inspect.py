"""`edge-tune data inspect`: the pure statistics helpers, the renderer, and real runs of the
command on the demo data with the embedded default model."""

from __future__ import annotations

import io
import json
from itertools import pairwise

import pytest
from rich.console import Console

from tests.helpers.cli import assert_one_line_error, run_cli
from edge_tune.data.inspect import histogram, length_stats, merge_spans, percentile, summarize
from edge_tune.errors import EdgeTuneError
from edge_tune.render.inspect import bar, example_text, render_inspect


# ---- pure helpers -----------------------------------------------------------------------------

def test_percentile_interpolates_like_numpy():
    s = [1, 2, 3, 4]
    assert percentile(s, 0) == 1 and percentile(s, 100) == 4
    assert percentile(s, 50) == 2.5
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([7], 95) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_length_stats():
    st = length_stats([5, 1, 3, 2, 4])
    assert st == {"min": 1, "median": 3, "p95": 4.8, "max": 5, "mean": 3.0}
    assert isinstance(st["median"], int)  # whole values stay token counts
    assert length_stats([10, 20])["median"] == 15
    assert length_stats([]) == {"min": None, "median": None, "p95": None, "max": None,
                                "mean": None}
    lengths = [3, 100, 7, 7, 42, 9, 1000, 12]
    st = length_stats(lengths)
    assert st["min"] <= st["median"] <= st["p95"] <= st["max"]


def test_histogram_bins_cover_the_range_and_count_everything():
    lengths = list(range(55, 131)) + [60] * 10
    bins = histogram(lengths)
    assert len(bins) == 10
    assert bins[0]["lo"] == 55 and bins[-1]["hi"] == 130
    assert sum(b["count"] for b in bins) == len(lengths)
    for a, b in pairwise(bins):
        assert b["lo"] == a["hi"] + 1  # consecutive, inclusive, no gaps or overlaps
    for b in bins:
        assert b["count"] == sum(1 for x in lengths if b["lo"] <= x <= b["hi"])


def test_histogram_edge_cases():
    assert histogram([]) == []
    assert histogram([4, 4, 4]) == [{"lo": 4, "hi": 4, "count": 3}]
    assert histogram([1, 2, 3]) == [{"lo": 1, "hi": 1, "count": 1}, {"lo": 2, "hi": 2, "count": 1},
                                    {"lo": 3, "hi": 3, "count": 1}]
    assert len(histogram(list(range(1000)), bins=4)) == 4
    with pytest.raises(ValueError):
        histogram([1], bins=0)


def test_merge_spans():
    assert merge_spans([(5, 8), (0, 2), (2, 3), (7, 10), (12, 12)]) == [[0, 3], [5, 10]]
    assert merge_spans([]) == []


def test_summarize_counts_truncation_and_dropped_examples():
    s = summarize([10, 50, 100], [4, 20, 30], seq_len=40, trained_kept=[4, 0, 12])
    assert s["tokens_total"] == 160 and s["tokens_trained"] == 54
    assert s["trained_share"] == round(54 / 160, 4)
    assert s["truncated"] == 2 and s["dropped"] == 1
    assert s["tokens_trained_within_seq_len"] == 16
    assert s["lengths"]["max"] == 100 and sum(b["count"] for b in s["histogram"]) == 3


# ---- the renderer (pure: a report in, text out) -----------------------------------------------

def test_bar():
    assert bar(0, 10) == "" and bar(5, 0) == ""
    assert bar(10, 10, width=4) == "████"
    assert bar(5, 10, width=3) == "█▌"
    assert bar(1, 1000, width=10) == "▏"  # a non-zero count is never invisible


def _report(**over) -> dict:
    text = "<user>hi</user><bot>Arr, matey!</bot>\n"
    start = text.index("Arr")
    report = {"path": "x.jsonl", "model": "default", "format": "openai", "formats": {},
              "records": 3, "skipped": 0, **summarize([10, 50, 100], [4, 20, 30], 40, [4, 0, 12]),
              "first_example": {"source": "x.jsonl", "line": 1, "text": text,
                                "spans": [[start, start + len("Arr, matey!</bot>")]],
                                "cut": None}}
    report["first_example"].update(over)
    return report


def test_example_text_highlights_trained_spans():
    ex = _report()["first_example"]
    t = example_text(ex)
    assert t.plain == ex["text"]
    styled = {t.plain[s.start:s.end] for s in t.spans if "green" in str(s.style)}
    assert styled == {"Arr, matey!</bot>"}
    marked = example_text(ex, marks=True).plain
    assert "\u27e6Arr, matey!</bot>\u27e7" in marked
    cut = example_text(dict(ex, cut=ex["text"].index("matey"))).plain
    assert "Arr, \u2702 --seq-len cuts here \u2702matey!" in cut


def test_render_inspect_without_styles_marks_and_summarises():
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    render_inspect(_report(), console)
    text = console.export_text()
    for needle in ("x.jsonl", "openai", "2 of 3 examples truncated",
                   "1 loses every trained",
                   "\u27e6Arr, matey!", "legend", "trained"):
        assert needle in text, needle


# ---- the real command -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_at_32(hf_dir, demo_jsonl) -> dict:
    proc = run_cli("data", "inspect", str(demo_jsonl), "--json", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_report_on_the_demo_data(report_at_32):
    r = report_at_32
    assert r["format"] == "openai"
    assert r["records"] == 200 and r["skipped"] == 0
    assert 0 < r["tokens_trained"] < r["tokens_total"]
    assert 0 < r["trained_share"] < 1
    assert r["trained_share"] == pytest.approx(r["tokens_trained"] / r["tokens_total"], abs=1e-4)
    L = r["lengths"]
    assert 0 < L["min"] <= L["median"] <= L["p95"] <= L["max"]
    assert L["min"] <= L["mean"] <= L["max"]
    assert sum(b["count"] for b in r["histogram"]) == 200
    assert r["histogram"][0]["lo"] == L["min"] and r["histogram"][-1]["hi"] == L["max"]


def test_truncation_is_consistent_with_seq_len(report_at_32):
    r = report_at_32
    assert r["seq_len"] == 32
    assert r["truncated"] > r["records"] // 2  # most demo conversations are longer than 32
    assert r["truncated"] <= r["records"]
    if r["lengths"]["min"] > 32:
        assert r["truncated"] == r["records"]
    assert r["tokens_trained_within_seq_len"] <= r["tokens_trained"]
    # Shorter than its cut at seq_len? The histogram says how many are past it.
    past = sum(b["count"] for b in r["histogram"] if b["lo"] > 32)
    assert past <= r["truncated"]


def test_first_example_spans_are_the_assistant_reply(report_at_32):
    ex = report_at_32["first_example"]
    text, spans = ex["text"], ex["spans"]
    assert spans
    for a, b in spans:
        assert 0 <= a < b <= len(text)
    assert text[spans[0][0]:spans[0][1]].startswith("Arr, matey!")
    assert "What is the chemical symbol for gold?" in text[:spans[0][0]]  # the prompt: context
    assert ex["cut"] is not None and ex["cut"] < spans[0][0]  # at 32 tokens the reply is lost


def test_human_output(hf_dir, demo_jsonl):
    proc = run_cli("data", "inspect", str(demo_jsonl))
    assert proc.returncode == 0, proc.stderr
    assert "Arr, matey!" in proc.stdout
    assert "trained" in proc.stdout
    assert "openai" in proc.stdout and "200" in proc.stdout
    assert "0 of 200 examples truncated" in proc.stdout  # nothing in the demo is near 512
    assert "\u27e6Arr, matey!" in proc.stdout  # piped: the trained span is bracketed


def test_text_records_are_trained_on_whole(hf_dir, tmp_path):
    from edge_tune.data.inspect import inspect_data

    data = tmp_path / "notes.txt"
    data.write_text("The quick brown fox jumps over the lazy dog, again and again.\n\nShort.\n")
    r = inspect_data(data, seq_len=4)
    assert r["format"] == "text" and r["records"] == 2
    assert r["tokens_trained"] == r["tokens_total"] and r["trained_share"] == 1.0
    assert r["truncated"] == 1  # only the long line is over 4 tokens
    ex = r["first_example"]
    assert ex["spans"] == [[0, len(ex["text"])]]
    assert 0 < ex["cut"] < len(ex["text"])


# ---- bad input: one line, exit code 2 ---------------------------------------------------------

def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("data", "inspect", str(tmp_path / "nope.jsonl")),
                           "nope.jsonl", "no such data file")


def test_malformed_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{{not json\n")
    assert_one_line_error(run_cli("data", "inspect", str(data), "--json"), "bad.jsonl:2:")


@pytest.mark.parametrize("flags,needle", [
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "many"], "--seq-len"),
    (["--format", "yaml"], "unknown data format"),
    (["--model", "not a model!"], "not a hub ID"),
])
def test_bad_flags(demo_jsonl, flags, needle):
    assert_one_line_error(run_cli("data", "inspect", str(demo_jsonl), *flags), needle)


# ---- templates that rewrite history, tool data, no template (tiny in-memory tokenizers) -------

def test_a_record_that_trains_per_turn_shows_each_example(tmp_path):
    from tests.helpers.chat_tokenizer import byte_tokenizer
    from edge_tune.data.formats import read_records
    from edge_tune.data.inspect import inspect_records
    from edge_tune.templates.builtin import BUILTIN

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Go"}, {"role": "assistant", "content": "A2",
                                                 "weight": 1},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "A3",
                                                  "weight": 0}]
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"messages": turns}) + "\n")
    report = inspect_records(byte_tokenizer(BUILTIN["qwen3"], "qwen3"), read_records(data),
                             str(data), "tiny-qwen3", 512)
    assert report["records"] == 1 and report["examples"] == 2  # A3 (weight 0) is context
    assert report["tools"]["context_turns"] == 1
    ex = report["first_example"]
    shown = [ex] + ex["more"]
    assert [[p["text"][a:b] for a, b in p["spans"]] for p in shown] == [
        ["<think>\n\n</think>\n\nA1<|im_end|>\n"], ["<think>\n\n</think>\n\nA2<|im_end|>\n"]]
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    render_inspect(report, console)
    text = console.export_text()
    assert "example 1 of 2 of this record" in text and "example 2 of 2" in text
    assert "2 (one per assistant turn" in text and "1 assistant turn is context only" in text


def test_no_chat_template_names_the_option(tmp_path):
    from tests.helpers.chat_tokenizer import byte_tokenizer
    from edge_tune.data.formats import read_records
    from edge_tune.data.inspect import inspect_records

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(EdgeTuneError, match=r"^--model base: the model has no chat template.*"
                       r"--chat-template NAME\|FILE"):
        inspect_records(byte_tokenizer(None), read_records(data), str(data), "base", 512)


def test_template_faults_stop_inspect_with_the_line_or_are_skipped(tmp_path):
    from tests.helpers.chat_tokenizer import byte_tokenizer
    from edge_tune.data.formats import read_records
    from edge_tune.data.inspect import inspect_records
    from edge_tune.templates.builtin import BUILTIN

    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, *ok["messages"]]}
    data = tmp_path / "d.jsonl"
    data.write_text(f"{json.dumps(ok)}\n{json.dumps(bad)}\n")
    tok = byte_tokenizer(BUILTIN["gemma2"], "gemma2")
    with pytest.raises(EdgeTuneError, match=rf"^{data}:2: the template says: System role not "
                       "supported"):
        inspect_records(tok, read_records(data), str(data), "m", 512)
    r = inspect_records(tok, read_records(data), str(data), "m", 512, skip_invalid=True)
    assert r["records"] == 1 and r["skipped"] == 1 and r["skipped_lines"] == [2]
    folded = inspect_records(tok, read_records(data), str(data), "m", 512, system_mode="fold")
    assert folded["records"] == 2 and folded["skipped"] == 0
