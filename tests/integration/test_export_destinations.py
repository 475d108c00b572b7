"""``export``'s destinations: one that cannot be written (a file where a folder is wanted, a
folder inside a file, a place no one can create files in) is one line with exit 2 before any
work, and an OSError while writing is one line too, never "internal error"."""

from __future__ import annotations

import pytest

from edge_tune.errors import UsageError
from edge_tune.fsutil import write_errors_say
from tests.helpers.cli import assert_one_line_error, run_cli_in_process


@pytest.mark.parametrize("flag, where, needles", [
    ("--ollama", "file", ("--ollama {file}: exists and is not a directory",)),
    ("--vllm", "file", ("--vllm {file}: exists and is not a directory",)),
    ("-o", "file/x.gguf", ("--output {file}/x.gguf: {file} is a file, not a folder",)),
    ("-o", "folder", ("--output {folder}: is a folder; expected a file name",)),
    ("--ollama", "/proc/nope", ("--ollama /proc/nope: cannot write into /proc",)),
])
def test_a_destination_that_cannot_be_written_is_refused_first(tmp_path, flag, where, needles):
    # The "run" is an empty folder: reaching any export work would fail differently.
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "run").mkdir()
    names = {"file": tmp_path / "file", "folder": tmp_path / "folder"}
    dest = where if where.startswith("/") else str(tmp_path / where)
    proc = run_cli_in_process("export", str(tmp_path / "run"), flag, dest)
    assert_one_line_error(proc, *(n.format(**names) for n in needles))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "run"]


def test_an_oserror_while_writing_is_one_line(tmp_path):
    with pytest.raises(UsageError) as info:
        with write_errors_say("the run is unchanged"):
            (tmp_path / "file").write_text("x")
            (tmp_path / "file" / "Modelfile").write_text("FROM x")
    assert str(info.value) == (f"{tmp_path / 'file' / 'Modelfile'}: Not a directory; "
                               "the run is unchanged")
    with pytest.raises(ValueError):  # anything else is not a write error
        with write_errors_say("the run is unchanged"):
            raise ValueError("a bug")
