"""The output rules (:class:`austeer_pl.core.output.Output`) and JSON reading, against hand-made files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from austeer_pl.core.fileio import (
    JSON_MARKER,
    is_marked_json,
    is_marked_png,
    json_output,
    jsonl_with_keys,
    parse_json,
    png_output,
    save_figure,
    write_json_output,
)
from austeer_pl.core.output import Output, remove_stale_temporaries
from austeer_pl.errors import AusteerError


def test_a_report_replaces_our_own_and_refuses_others_without_overwrite(tmp_path):
    path = tmp_path / "r.json"
    write_json_output(json_output(path).check(), {"a": 1})
    assert json.loads(path.read_text())[JSON_MARKER]["output"] == "report"
    write_json_output(json_output(path).check(), {"a": 2})  # ours: no flag needed
    assert json.loads(path.read_text())["a"] == 2
    path.write_text('{"a": 3}')  # a JSON of someone else's
    with pytest.raises(AusteerError, match="not a report that austeer-pl wrote; pass --overwrite"):
        json_output(path).check()
    write_json_output(json_output(path, overwrite=True).check(), {"a": 4})
    assert json.loads(path.read_text())["a"] == 4


def test_a_folder_output_never_replaces_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "thesis.tex").write_text("three years")
    ours = lambda p: (p / "ours.txt").exists()  # noqa: E731
    with pytest.raises(AusteerError, match="holds other files"):
        Output(folder, "result", ours, overwrite=True, folder=True, ours_need_overwrite=True).check()
    (folder / "thesis.tex").unlink()
    (folder / "ours.txt").write_text("x")
    with pytest.raises(AusteerError, match="pass --overwrite"):
        Output(folder, "result", ours, folder=True, ours_need_overwrite=True).check()
    out = Output(folder, "result", ours, overwrite=True, folder=True, ours_need_overwrite=True).check()
    with out.writing() as tmp:
        (tmp / "ours.txt").write_text("new")
    assert (folder / "ours.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_swap_judges_what_is_there_then_and_puts_it_back(tmp_path):
    path = tmp_path / "r.json"
    output = json_output(path).check()
    with pytest.raises(AusteerError, match="it appeared while this command ran"), output.writing() as tmp:
        tmp.write_text("{}")
        path.write_text("mine")  # a user's file lands there while we write
    assert path.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_an_input_is_never_an_output_even_with_overwrite(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("{}\n")
    with pytest.raises(AusteerError, match="is \\(or holds, or lies in\\) the input"):
        json_output(task, overwrite=True).check(inputs=[task])
    link = tmp_path / "link.jsonl"
    os.link(task, link)  # the same file under another name
    with pytest.raises(AusteerError, match="the input"):
        json_output(link, overwrite=True).check(inputs=[task])
    folder = tmp_path / "state"
    folder.mkdir()
    with pytest.raises(AusteerError, match="the input"):
        json_output(folder / "r.json").check(inputs=[folder])


def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path):
    with pytest.raises(AusteerError, match="its name is 300 bytes"):
        json_output(tmp_path / ("x" * 300)).check()


def test_recognisers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    ours = save_figure(fig, png_output(tmp_path / "p.png").check())
    plt.close(fig)
    theirs = tmp_path / "q.png"
    fig = plt.figure()
    fig.savefig(theirs)
    plt.close(fig)
    assert is_marked_png(ours) and not is_marked_png(theirs)
    rows = tmp_path / "g.jsonl"
    rows.write_text('{"prompt": "a", "unsteered": "b", "steered": "c"}\n')
    assert jsonl_with_keys(("prompt", "unsteered", "steered"))(rows)
    assert not jsonl_with_keys(("prompt", "positive", "negative"))(rows)
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert not is_marked_json(tmp_path / "x.json")


def test_stale_temporaries_of_dead_writers_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    from austeer_pl.core.output import _HOST

    target = tmp_path / "r.json"
    stale = tmp_path / f".r.json.{_HOST}-{dead}-0123abcd.tmp"
    mine = tmp_path / f".r.json.{_HOST}-{os.getpid()}-0123abcd.tmp"
    other = tmp_path / f".other.json.{_HOST}-{dead}-0123abcd.tmp"
    elsewhere = (
        tmp_path / f".r.json.{'0' * 6 if _HOST != '0' * 6 else '1' * 6}-{dead}-0123abcd.tmp"
    )  # another host's: its pid means nothing here
    for path in (stale, mine, other, elsewhere):
        path.write_text("x")
    assert remove_stale_temporaries(target) == [stale]
    assert not stale.exists() and mine.exists() and other.exists() and elsewhere.exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "invalid JSON"),
        ('{"a": ' + "9" * 5000 + "}", "unreadable JSON"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        (b"{\x80}", "not UTF-8"),
    ],
)
def test_parse_json_is_one_line_whatever_the_fault(text, needle):
    with pytest.raises(AusteerError, match=needle) as err:
        parse_json(text, "f.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("f.json")


def test_output_path_is_a_path(tmp_path):
    assert isinstance(Output(str(tmp_path / "a"), "x", lambda p: True).path, Path)
