"""benchmarks/methods_table.py: the table's numbers from the comparison reports (pooled paired tests, gains)."""

from __future__ import annotations

import json

import pytest

from austeer_pl.scoring.statistics import mcnemar

from helpers import methods_table_module


def row(name, correct, **extra):
    return {
        "name": name,
        "test_accuracy": sum(correct) / len(correct),
        "val_accuracy": 0.5,
        "test": {"per_example_correct": correct},
        "n_steered_activations": extra.pop("steered", 0),
        "hyperparameters": {},
        **extra,
    }


def report(seed, rows):
    return {
        "n_test": len(rows[0]["test"]["per_example_correct"]),
        "n_val": 4,
        "n_train_pairs": 8,
        "base_model": "m",
        "methods": rows,
    }


def test_pooled_paired_tests_gains_and_side_effects(tmp_path):
    a0, b0, c0 = [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 0, 0]
    a1, b1, c1 = [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]
    effects = {"kl_ordinary_text": 0.1, "perplexity": 3.0, "distinct_2": 0.9, "off_task": "x", "off_task_change": -0.02}
    for seed, (a, b, c) in enumerate(((a0, b0, c0), (a1, b1, c1))):
        rows = [
            row("unsteered", a, side_effects={**effects, "kl_ordinary_text": 0.0, "off_task_change": 0.0}),
            row("austeer", b, steered=10, side_effects=effects),
            row("zero_shot", c, added_prompt_tokens=20.0, side_effects=None),
        ]
        omitted = {"calibrated": "the offsets would learn the listing order"} if seed else {}
        (tmp_path / f"rotten_tomatoes-seed{seed}.json").write_text(
            json.dumps({**report(seed, rows), "omitted": omitted})
        )
    md, readme = tmp_path / "t.md", tmp_path / "README.md"
    table = methods_table_module()
    readme.write_text(f"# Benchmarks\n\nBefore.\n\n{table.START}\nold table\n{table.END}\n\nAfter.\n")
    args = ["--results", str(tmp_path), "--markdown", str(md), "--plot", str(tmp_path / "p.png")]
    assert table.main([*args, "--readme", str(readme)]) == 0
    (summary,) = json.loads((tmp_path / "summary.json").read_text())["tasks"]
    rows = summary["rows"]
    mean = lambda xs: sum(sum(x) / len(x) for x in xs) / len(xs)  # noqa: E731
    assert rows["austeer"]["test_accuracy"] == pytest.approx(mean([b0, b1]))
    assert rows["austeer"]["gain_points"] == pytest.approx(100 * (mean([b0, b1]) - mean([a0, a1])))
    assert rows["austeer"]["p_vs_unsteered"] == mcnemar(a0 + a1, b0 + b1)["p_value"]
    assert rows["austeer"]["best_other"] == "zero_shot" and summary["best"] == "austeer"
    assert rows["zero_shot"]["p_vs_best_other"] == mcnemar(b0 + b1, c0 + c1)["p_value"]
    assert rows["zero_shot"]["added_prompt_tokens"] == 20.0 and rows["zero_shot"]["kl_ordinary_text"] is None
    text = md.read_text()
    assert "| austeer | " in text and "rotten_tomatoes seed 2" in text  # the missing cells are listed
    # The overview: one gain per method and task (* where p < 0.05, bold for the task's best), the side-task
    # change of a steered method in brackets, a prompt's tokens in parentheses; the unsteered row its accuracy.
    star = lambda name: "\\*" if rows[name]["p_vs_unsteered"] < 0.05 else ""  # noqa: E731
    austeer = f"**{rows['austeer']['gain_points']:+.1f}{star('austeer')}** [-2.0]"
    zero = f"{rows['zero_shot']['gain_points']:+.1f}{star('zero_shot')} (20 tok)"
    assert f"| austeer | {austeer} |" in text and f"| zero_shot | {zero} |" in text
    assert f"| unsteered | {mean([a0, a1]):.3f} |" in text
    # The README keeps its own text and gets the overview between its markers, the old table gone.
    updated = readme.read_text()
    assert updated.startswith("# Benchmarks\n\nBefore.\n\n") and updated.endswith(f"{table.END}\n\nAfter.\n")
    assert f"| austeer | {austeer} |" in updated and "old table" not in updated
    # A README without the markers is refused before anything is written.
    (tmp_path / "bare.md").write_text("# no markers\n")
    md.unlink()
    assert table.main([*args, "--readme", str(tmp_path / "bare.md")]) == 1
    assert not md.exists() and (tmp_path / "bare.md").read_text() == "# no markers\n"
    # A method a cell refused is named under the table with the reason, not left out silently.
    assert "Not run: calibrated (seeds 1), since the offsets would learn the listing order." in text
    assert (tmp_path / "p.png").stat().st_size > 0
    # The plot's points: the side-task axis in points (the report holds fractions), prompts at the origin.
    points = {p["method"]: p for p in table.plot_points([summary])}
    assert sorted(points) == ["austeer", "zero_shot"]  # unsteered is the origin, not a point
    assert points["austeer"]["off_task_points"] == pytest.approx(-2.0)
    assert points["austeer"]["kl_ordinary_text"] == pytest.approx(0.1)
    assert points["austeer"]["gain_points"] == rows["austeer"]["gain_points"]
    assert points["zero_shot"]["prompt"] and points["zero_shot"]["off_task_points"] == 0.0


def test_prompts_sit_at_the_origin_of_the_side_effect_axes_whatever_a_report_says():
    """A prompt or an offset reaches only the task's own requests: its point is at 0 on both side-effect axes
    even where a report carries numbers for it; a steered row's unmeasured effect is 0 too."""
    effects = {"kl_ordinary_text": 0.4, "off_task_change": 0.05, "gain_points": 3.0}
    summary = {"task": "t", "rows": {"unsteered": {}, "few_shot": dict(effects), "iti": dict(effects)}}
    summary["rows"]["caa"] = {**effects, "kl_ordinary_text": None, "off_task_change": None}
    points = {p["method"]: p for p in methods_table_module().plot_points([summary])}
    assert (points["few_shot"]["kl_ordinary_text"], points["few_shot"]["off_task_points"]) == (0.0, 0.0)
    assert points["iti"]["kl_ordinary_text"] == 0.4 and points["iti"]["off_task_points"] == pytest.approx(5.0)
    assert (points["caa"]["kl_ordinary_text"], points["caa"]["off_task_points"]) == (0.0, 0.0)
    assert not points["iti"]["prompt"] and points["few_shot"]["prompt"]


def part(rows, **extra):
    return {**report(0, rows), "test_uids_sha256": "abc", "seed": 0, "total_seconds": 60.0, **extra}


def test_parts_of_a_cell_merge_and_parts_of_different_cells_do_not(tmp_path, capsys):
    table = methods_table_module()
    base = row("unsteered", [1, 0, 1, 0])
    a = part([base, row("iti", [1, 1, 1, 0]), row("caa", [0, 0, 1, 0])], omitted={"calibrated": "why"})
    b = part([base, row("random_units", [1, 1, 0, 0])], total_seconds=30.0)
    merged = table.merge_parts([a, b], ["unsteered", "iti", "random_units", "caa"])
    assert [m["name"] for m in merged["methods"]] == ["unsteered", "iti", "random_units", "caa"]
    assert merged["methods"][2] == b["methods"][1] and merged["total_seconds"] == 90.0
    assert merged["omitted"] == {"calibrated": "why"} and [p["total_seconds"] for p in merged["parts"]] == [60.0, 30.0]
    bad = {
        "in 'test_uids_sha256'": [a, {**b, "test_uids_sha256": "abd"}],
        "in 'seed'": [a, {**b, "seed": 1}],
        "must include 'unsteered'": [a, part([row("random_units", [1, 1, 0, 0])])],
        "score the test examples differently": [a, part([row("unsteered", [1, 0, 1, 1]), row("sadi", [1, 1, 1, 1])])],
        "'iti' is in two parts": [a, part([base, row("iti", [1, 1, 1, 0])])],
        "two or more parts": [a],
    }
    for message, parts in bad.items():
        with pytest.raises(ValueError, match=message):
            table.merge_parts(parts)
    # The command: the merged cell written whole; a bad merge writes nothing and says why in one line.
    paths = []
    for i, p in enumerate((a, b, {**b, "seed": 1})):
        paths.append(tmp_path / f"p{i}.json")
        paths[-1].write_text(json.dumps(p))
    out = tmp_path / "cell.json"
    assert table.main(["--merge", str(paths[0]), str(paths[1]), "--into", str(out)]) == 0
    assert [m["name"] for m in json.loads(out.read_text())["methods"]] == ["unsteered", "iti", "caa", "random_units"]
    assert table.main(["--merge", str(paths[0]), str(paths[2]), "--into", str(tmp_path / "no.json")]) == 1
    assert not (tmp_path / "no.json").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "differs from part 1 in 'seed'" in err
