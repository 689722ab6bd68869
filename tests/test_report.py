"""The report regenerates every table/figure from a fake-but-consistent metrics tree, copies numbers exactly,
shows missing cells as "—" and keeps paper numbers inside the labelled reference sections."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import minimal
from magdi.config import parse_params
from magdi.mag import MAG, Node, mag_stats, write_mags
from magdi.report import DASH, PAPER_LABEL, build_report, load_paper_numbers, md_table

TASKS = ["strategyqa", "gsm8k"]
EXPECTED = [
    *(f"{t}.{ext}" for t in ("table1_main", "table2_tokens", "table3_teachers_vs_students", "table4_ood",
                              "table5_self_consistency", "table6_encoder", "table7_student_scaling",
                              "table9_graph_types", "table10_graph_structure", "table12_mag_stats",
                              "table13_multitask", "training_runs") for ext in ("md", "csv")),
    "fig2_example_mag.png", "fig4_accuracy_vs_tokens.png", "fig5_student_scaling.png",
    "fig6_data_scaling.png", "training_curves.png", "README.md", "significance.md", "significance.csv",
    *(f"{sub}/{t}.html" for sub in ("mags", "predictions") for t in TASKS),
]


def _params():
    return parse_params(minimal({
        "profile": "test_profile",
        "teachers": {"agents": [{"name": "a", "backend": "local"}, {"name": "b", "backend": "reference"}],
                     "max_rounds": 2},
        "experiments": {
            "tasks": TASKS,
            "methods": ["sit_a", "dss_mt", "magdi_r0", "magdi"],
            "ablation_tasks": ["strategyqa"],
            "ablations": {"magdi_ud": {"graph": "ud"}, "magdi_node_attention": {"encoder": "node_attention"},
                          "magdi_frozen": {"node_repr": "frozen"}, "magdi_no_g2": {"exclude_graph_types": ["G2"]},
                          "magdi_n2": {"max_mags": 2}},
            "ood_tasks": ["boolq"],
            "self_consistency_methods": ["magdi"],
            "multitask_methods": ["magdi_mt"],
        },
    }))


def _ev(acc: float, lo: float, hi: float, tokens: float, **extra) -> dict:
    return {"n": 24, "accuracy": acc, "ci95_low": lo, "ci95_high": hi, "mean_tokens": tokens, "unparsed": 0,
            **extra}


# method -> task -> eval metrics. dss_mt has no files at all; sit_a lacks gsm8k; magdi_frozen is missing.
EVAL = {
    "zero_shot": {"strategyqa": _ev(0.5, 0.3, 0.7, 40.0), "gsm8k": _ev(0.125, 0.0, 0.25, 60.0),
                  "boolq": _ev(0.375, 0.2, 0.55, 20.0)},
    "sit_a": {"strategyqa": _ev(0.5416666666666666, 0.333, 0.75, 30.0)},
    "magdi_r0": {"strategyqa": _ev(0.5833333333333334, 0.375, 0.7916, 31.0), "gsm8k": _ev(0.25, 0.083, 0.4166, 50.0)},
    "magdi": {"strategyqa": _ev(0.625, 0.4166, 0.8333, 32.0, sc=_ev(0.7083333333333334, 0.5, 0.875, 33.0)),
              "gsm8k": _ev(0.2916666666666667, 0.125, 0.5, 48.0)},
    "magdi_mt": {"strategyqa": _ev(0.4583333333333333, 0.25, 0.6666, 35.0), "gsm8k": _ev(0.2083333333333333, 0.04, 0.375, 55.0),
                 "boolq": _ev(0.4166666666666667, 0.2, 0.625, 22.0)},
    "magdi_ud": {"strategyqa": _ev(0.6666666666666666, 0.4583, 0.875, 31.0)},
    "magdi_node_attention": {"strategyqa": _ev(0.4166666666666667, 0.2083, 0.625, 30.0)},
    "magdi_no_g2": {"strategyqa": _ev(0.5416666666666666, 0.333, 0.75, 29.0)},
    "magdi_n2": {"strategyqa": _ev(0.4583333333333333, 0.25, 0.6666, 28.0)},
}


def _node(agent: str, rnd: int, correct: bool, ans: str = "yes") -> Node:
    return Node(agent, rnd, f"{agent} thinks {ans}", ans, 0.8, correct, n_tokens=10)


def _mags() -> list[MAG]:
    return [
        MAG("s0", "strategyqa", "Is water wet?", "yes", [_node("a", 0, True), _node("b", 0, True)],
            team_answer="yes", team_correct=True, consensus=True),
        MAG("s1", "strategyqa", "Can pigs fly?", "no",
            [_node("a", 0, False), _node("b", 0, True, "no"), _node("a", 1, False), _node("b", 1, True, "no"),
             _node("a", 2, True, "no"), _node("b", 2, True, "no")], team_answer="no", team_correct=True),
        MAG("s2", "strategyqa", "Is 2 odd?", "no", [_node("a", 0, True, "no"), _node("b", 0, False)],
            team_answer="yes", team_correct=False),
    ]


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    metrics, mags_dir = tmp_path / "metrics", tmp_path / "mags"
    for meth, by_task in EVAL.items():
        for task, m in by_task.items():
            _write(metrics / "eval" / meth / f"{task}.json", {**m, "task": task, "method": meth})
    for meth, n in (("magdi", 3), ("magdi_n2", 2), ("magdi_ud", 3)):
        _write(metrics / "train" / meth / "strategyqa.json", {"n_mags": n, "steps": 2, "final_loss": 1.0,
                                                               "lr": 3e-4, "tokens": 1234, "w_ntp": 1.0,
                                                               "w_contrastive": 0.01, "w_graph": 0.1,
                                                               "adapter_sha256": f"{n}" + "ab" * 31 + "c"})
        (metrics / "train" / meth / "strategyqa_history.csv").write_text("step,loss,ntp,lr\n1,2.5,2.0,0.1\n2,2.0,1.8,0.1\n")
    mags = _mags()
    write_mags(mags_dir / "strategyqa.jsonl", mags)
    stats = mag_stats(mags)
    stats["team_accuracy"] = 2 / 3
    stats["teacher_tokens_per_question"] = 320.0
    _write(metrics / "mags" / "strategyqa.json", stats)  # gsm8k MAG stats deliberately missing
    return metrics, mags_dir


def _section(md: str, paper: bool) -> str:
    head = f"## {PAPER_LABEL}"
    i = md.find(head)
    if paper:
        return md[i:] if i >= 0 else ""
    return md if i < 0 else md[:i]


def _md_rows(md: str) -> dict[str, list[str]]:
    """First table of the 'ours' part: row label -> cells."""
    rows = {}
    for line in _section(md, paper=False).splitlines():
        if line.startswith("| ") and not line.startswith("| :"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_build_report_tables_and_figures(tree: tuple[Path, Path], tmp_path: Path) -> None:
    metrics, mags_dir = tree
    out = tmp_path / "reports"
    files = build_report(_params(), out, metrics, mags_dir)
    names = {f.relative_to(out).as_posix() for f in files}
    for e in EXPECTED:
        assert e in names, e
        assert (out / e).is_file() and (out / e).stat().st_size > 0, e

    t1 = (out / "table1_main.md").read_text()
    rows = _md_rows(t1)
    assert list(rows)[1:] == ["zero_shot", "sit_a", "dss_mt", "magdi_r0", "magdi", "magdi_mt"]
    # numbers equal the JSON numbers, CI in brackets
    assert rows["zero_shot"][0] == "50.0 [30.0, 70.0]"
    assert rows["magdi"][0] == "62.5 [41.7, 83.3]"
    assert rows["magdi"][1] == "29.2 [12.5, 50.0]"
    # Avg = mean of the task cells
    for meth in ("zero_shot", "magdi_r0", "magdi", "magdi_mt"):
        accs = [EVAL[meth][t]["accuracy"] for t in TASKS]
        assert rows[meth][-1] == f"{100 * sum(accs) / len(accs):.1f}"
    # missing cells: a whole missing method, and a missing task (partial average flagged)
    assert rows["dss_mt"] == [DASH, DASH, DASH]
    assert rows["sit_a"][1] == DASH and rows["sit_a"][2] == "54.2†"

    # paper numbers only in the labelled reference part; ours only outside it
    paper = load_paper_numbers()
    ours_part, paper_part = _section(t1, False), _section(t1, True)
    assert paper_part and "reference only" in paper_part
    for key, vals in paper["table1_main"].items():
        for t in ("strategyqa", "gsm8k", "avg"):
            s = f"{vals[t]:.2f}"
            assert s in paper_part, (key, t)
            assert s not in ours_part, (key, t, s)
    df = pd.read_csv(out / "table1_main.csv")
    ours = df[df["source"] == "ours"].set_index("method")
    assert ours.loc["magdi", "strategyqa"] == pytest.approx(62.5)
    assert pd.isna(ours.loc["dss_mt", "strategyqa"])
    assert set(df[df["source"] == PAPER_LABEL]["method"]) == set(paper["table1_main"])
    assert not (df[df["source"] == "ours"]["strategyqa"] == 74.24).any()

    # Table 2: teacher tokens from MAG stats, student tokens from eval, reduction
    t2 = _md_rows((out / "table2_tokens.md").read_text())
    assert t2["strategyqa"] == ["320.0", "32.0", "10.0x"]
    assert t2["gsm8k"][0] == DASH and t2["gsm8k"][2] == DASH
    assert "924.5" in _section((out / "table2_tokens.md").read_text(), True)

    # Table 3: team accuracy + round-0 accuracy per agent from the MAGs (a: 2/3 correct, b: 2/3 correct)
    t3 = _md_rows((out / "table3_teachers_vs_students.md").read_text())
    assert t3["ReConcile team (teachers, training questions)"][:2] == ["66.7", DASH]
    assert t3["teacher a, round 0 (training questions)"][0] == "66.7"
    assert t3["magdi (student, test)"][0] == "62.5"
    assert "TRAINING questions" in (out / "table3_teachers_vs_students.md").read_text()

    # Table 4, 5, 6, 9, 10, 12, 13
    t4 = _md_rows((out / "table4_ood.md").read_text())
    assert t4["magdi_mt"][0].startswith("41.7") and t4["magdi_mt − zero_shot (points)"][0] == "+4.2"
    t5 = _md_rows((out / "table5_self_consistency.md").read_text())
    assert t5["magdi"][2:] == ["62.5 [41.7, 83.3]", "70.8 [50.0, 87.5]", "+8.3"]
    t6 = _md_rows((out / "table6_encoder.md").read_text())
    assert t6["magdi (encoder=gcn, node_repr=live)"][0].startswith("62.5")
    assert t6["magdi_node_attention (encoder=node_attention)"][0].startswith("41.7")
    assert t6["magdi_frozen (node_repr=frozen)"][0] == DASH
    t9 = _md_rows((out / "table9_graph_types.md").read_text())
    assert t9["magdi_no_g2 (exclude_graph_types=G2)"][0].startswith("54.2")
    t10 = _md_rows((out / "table10_graph_structure.md").read_text())
    assert t10["magdi_ud (graph=ud)"][0].startswith("66.7") and "magdi_node_attention" not in str(t10)
    t12 = pd.read_csv(out / "table12_mag_stats.csv")
    s = t12[(t12["source"] == "ours") & (t12["task"] == "strategyqa")].iloc[0]
    assert (s["n_mags"], s["G0"], s["G2"], s["round_2"], s["agent_a"]) == (3, 2, 1, 2, 5)
    t13 = _md_rows((out / "table13_multitask.md").read_text())
    assert t13["magdi_mt (one multi-task model)"][0].startswith("45.8")
    t7 = (out / "table7_student_scaling.md").read_text()
    assert "no other student in experiments.scaling_students" in t7
    runs = pd.read_csv(out / "training_runs.csv")
    assert len(runs) == len(TASKS) * 4 + 5 + 1  # methods x tasks, ablations on strategyqa, the multi-task run
    r = runs[(runs["task"] == "strategyqa") & (runs["run"] == "magdi_n2")].iloc[0]
    assert (r["n_mags"], r["steps"], r["lr"], r["tokens"]) == (2, 2, 3e-4, 1234)
    assert (r["w_ntp"], r["w_contrastive"], r["w_graph"]) == (1.0, 0.01, 0.1)
    assert r["adapter_sha256"] == "2" + "ab" * 31 + "c"  # the full digest in the CSV, 12 digits in the table
    assert runs[(runs["task"] == "strategyqa") & (runs["run"] == "magdi_r0")][["n_mags", "lr"]].isna().all(axis=None)
    md = (out / "training_runs.md").read_text()
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| strategyqa")]
    assert ["strategyqa", "magdi_r0", DASH, DASH] in [c[:4] for c in cells]  # no metrics file: cells missing
    assert ["strategyqa", "magdi_n2", "2" + "ab" * 5 + "a"] in [[*c[:2], c[-1]] for c in cells]

    readme = (out / "README.md").read_text()
    assert "test_profile" in readme and "n_test=" in readme and "reference only" in readme
    assert "dss_mt/strategyqa" in readme  # missing cells are listed


def test_build_report_with_nothing_does_not_crash(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    files = build_report(_params(), out, tmp_path / "no_metrics", tmp_path / "no_mags")
    assert {f.relative_to(out).as_posix() for f in files} >= set(EXPECTED)
    rows = _md_rows((out / "table1_main.md").read_text())
    assert rows["magdi"] == [DASH, DASH, DASH]


def test_corrupt_metrics_file_is_skipped(tree: tuple[Path, Path], tmp_path: Path) -> None:
    metrics, mags_dir = tree
    (metrics / "eval" / "magdi" / "gsm8k.json").write_text('{"accuracy": 0.5')  # torn write
    with pytest.warns(UserWarning, match="unreadable"):
        build_report(_params(), tmp_path / "r", metrics, mags_dir)
    assert _md_rows((tmp_path / "r" / "table1_main.md").read_text())["magdi"][1] == DASH


def test_md_table_escapes_and_dashes() -> None:
    md = md_table(["a", "b"], [["x|y", None]])
    assert "x\\|y" in md and DASH in md
    assert md_table(["a"], []) == "_no data_\n"


def test_fig4_labels_of_coinciding_points_are_joined() -> None:
    from magdi.report.figures import _merge_close_labels

    pts = [("magdi", 40.0, 21.7, "C0"), ("magdi_an", 41.0, 21.7, "C0"), ("dss_mt", 28.0, 18.3, "C0"),
           ("teachers", 41.0, 21.7, "C3")]
    assert _merge_close_labels(pts) == [("magdi, magdi_an", 40.0, 21.7, "C0"), ("", 41.0, 21.7, "C0"),
                                        ("dss_mt", 28.0, 18.3, "C0"), ("teachers", 41.0, 21.7, "C3")]


def test_fig4_label_merging_never_drops_a_name() -> None:
    from magdi.report.figures import _merge_close_labels

    chain = [("a", 100.0, 20.0, "C0"), ("b", 100.0, 20.9, "C0"), ("c", 100.0, 21.8, "C0")]
    labels = ", ".join(lab for lab, *_ in _merge_close_labels(chain) if lab)
    assert sorted(labels.split(", ")) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- paired significance


def _pred_rows(right: set[int], n: int = 10) -> list[dict]:
    return [{"id": f"q{i}", "task": "strategyqa", "question": f"Question {i}?", "output": f"The answer is "
             f"{'yes' if i in right else 'no'}.", "parsed": "yes" if i in right else "no", "gold": "yes",
             "correct": i in right, "n_tokens": 5} for i in range(n)]


#: method -> questions it gets right (of q0..q9, gold "yes"): MAGDi beats zero-shot on 6 discordant questions
#: and loses none (McNemar exact p = 2 / 2^6 = 0.03125); vs sit_a 1 discordant (p = 1); vs magdi_r0 none.
RIGHT = {"zero_shot": {0, 1}, "sit_a": set(range(7)), "magdi_r0": set(range(8)), "magdi": set(range(8))}


def paired_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Metrics and predictions that agree: accuracy = right / 10 on strategyqa; nothing on gsm8k."""
    metrics, runs = tmp_path / "metrics", tmp_path / "runs"
    for meth, right in RIGHT.items():
        acc = len(right) / 10
        _write(metrics / "eval" / meth / "strategyqa.json", {**_ev(acc, acc - 0.1, acc + 0.1, 10.0), "n": 10})
        train_task = "base" if meth == "zero_shot" else "strategyqa"
        f = runs / "eval" / train_task / meth / "predictions_strategyqa.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in _pred_rows(right)))
    return metrics, tmp_path / "mags", runs


def test_significance_files_and_table1_marks(tmp_path: Path) -> None:
    metrics, mags_dir, runs = paired_tree(tmp_path)
    out = tmp_path / "reports"
    build_report(_params(), out, metrics, mags_dir, runs)
    df = pd.read_csv(out / "significance.csv")
    assert list(df.columns) == ["task", "method_a", "method_b", "n", "acc_a", "acc_b", "diff", "ci_low", "ci_high",
                                "p_mcnemar", "p_holm", "comparison"]
    rows = {(r.method_a, r.method_b, r.comparison.startswith("MAGDi vs best")): r for r in df.itertuples()}
    zs = rows[("magdi", "zero_shot", False)]
    assert (zs.task, zs.n, zs.acc_a, zs.acc_b, zs.diff) == ("strategyqa", 10, 80.0, 20.0, 60.0)
    assert zs.p_mcnemar == pytest.approx(0.03125)
    assert 20.0 <= zs.ci_low <= 40.0 and 80.0 <= zs.ci_high <= 100.0  # d = six 1s, four 0s
    sit = rows[("magdi", "sit_a", False)]
    assert (sit.diff, sit.p_mcnemar) == (pytest.approx(10.0), 1.0)
    assert rows[("magdi", "sit_a", True)].p_mcnemar == 1.0  # the only SiT is the best SiT
    lvl = rows[("magdi", "magdi_r0", False)]  # magdi_cn / magdi_an absent: nearest lower level present
    assert (lvl.diff, lvl.ci_low, lvl.ci_high, lvl.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)
    # dss_mt has no predictions, gsm8k has none: never compared
    assert set(df["task"]) == {"strategyqa"} and "dss_mt" not in set(df["method_b"]) and len(df) == 5
    best_vs_zs = rows[("sit_a", "zero_shot", False)]  # the paper's ordering's second step; no Table 1 mark of its own
    assert best_vs_zs.comparison == "best SiT student vs zero-shot" and best_vs_zs.diff == pytest.approx(50.0)
    # Holm over the run's 5 comparisons, p sorted 0.03125, 0.0625, 1, 1, 1: 5 x 0.03125, then max(that, 4 x 0.0625)
    assert (zs.p_holm, best_vs_zs.p_holm) == (pytest.approx(0.15625), pytest.approx(0.25))
    assert not (zs.p_holm < 0.05)  # significant alone, not once the family is accounted for
    # Table 1: only the zero-shot cell is significantly different from its partner (MAGDi)
    t1 = _md_rows((out / "table1_main.md").read_text())
    assert t1["zero_shot"][0] == "20.0* [10.0, 30.0]"
    assert t1["sit_a"][0] == "70.0 [60.0, 80.0]"
    assert "*" not in t1["magdi_r0"][0] and "*" not in t1["magdi"][0]
    md = (out / "significance.md").read_text()
    assert "0.0312 *" in md and "best SiT" in md
    readme = (out / "README.md").read_text()
    assert "(predictions/strategyqa.html)" in readme and "(mags/strategyqa.html)" in readme
    assert "significance.md" in readme


def test_significance_without_predictions_writes_the_header(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    build_report(_params(), out, tmp_path / "m", tmp_path / "g", tmp_path / "r")
    assert (out / "significance.csv").read_text().startswith("task,method_a,method_b,n,acc_a,acc_b,diff,")
    assert "no comparison possible" in (out / "significance.md").read_text()


# ----------------------------------------------------------------------------- student scaling (Table 7 / Fig. 5)


def test_student_scaling_table_figure_and_significance(tmp_path: Path) -> None:
    """A second student (experiments.scaling_students) gets its own rows, ordered by size, and its own paired
    MAGDi − zero-shot comparison; the main student keeps its pair from the Table 1 comparisons."""
    raw = _params().model_dump()
    raw["experiments"].update({"scaling_students": ["big_student"], "scaling_tasks": ["strategyqa"]})
    raw["student"]["model"] = "smollm2_135m"
    p = parse_params(raw)
    metrics, runs = tmp_path / "metrics", tmp_path / "runs"
    # big student: MAGDi right on q0..q7, zero-shot on q0, q1 -> +60 points, 6 discordant, p = 2 / 2^6
    right = {"zero_shot": ({0, 1}, 135e6), "magdi": ({0, 1, 2}, 135e6),
             "zero_shot@big_student": ({0, 1}, 630e6), "magdi@big_student": (set(range(8)), 630e6)}
    for meth, (ok, size) in right.items():
        acc = len(ok) / 10
        _write(metrics / "eval" / meth / "strategyqa.json",
               {**_ev(acc, acc - 0.1, acc + 0.1, 10.0), "n": 10, "student_parameters": int(size)})
        f = runs / "eval" / ("base" if meth.startswith("zero_shot") else "strategyqa") / meth / "predictions_strategyqa.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in _pred_rows(ok)))
    out = tmp_path / "reports"
    build_report(p, out, metrics, tmp_path / "mags", runs)
    rows = _md_rows((out / "table7_student_scaling.md").read_text())
    labels = list(rows)
    assert labels[1:5] == ["smollm2_135m (135M) · No Teacher", "smollm2_135m (135M) · MAGDi",
                           "big_student (630M) · No Teacher", "big_student (630M) · MAGDi"]
    assert rows["big_student (630M) · MAGDi"][0] == "80.0 [70.0, 90.0]"
    assert rows["big_student (630M) · MAGDi"][1] == DASH  # gsm8k is not a scaling task
    md = (out / "table7_student_scaling.md").read_text()
    diff = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in md.split("MAGDi − No Teacher")[1]
            .split("## paper")[0].splitlines() if ln.startswith("| ") and "(" in ln}
    assert diff["big_student (630M)"] == "+60.0 [+30.0, +90.0] p=0.0312 *"
    assert diff["smollm2_135m (135M)"].startswith("+10.0 [") and diff["smollm2_135m (135M)"].endswith("p=1")
    df = pd.read_csv(out / "significance.csv")
    big = df[df["method_a"] == "magdi@big_student"].iloc[0]
    assert (big.method_b, big.task, big["diff"], big.p_mcnemar) == ("zero_shot@big_student", "strategyqa", 60.0,
                                                                pytest.approx(0.03125))
    csv7 = pd.read_csv(out / "table7_student_scaling.csv")
    ours = csv7[csv7["source"] == "ours"]
    assert list(ours["student_parameters"]) == [135000000, 135000000, 630000000, 630000000]
    assert (out / "fig5_student_scaling.png").stat().st_size > 10_000


def test_a_setting_that_differs_by_task_is_never_shown_as_one_number() -> None:
    from magdi.report.format import per_task

    assert per_task({"gsm8k": 64, "svamp": 64}) == "64"
    assert per_task({"gsm8k": 100, "svamp": 64}) == "100 on gsm8k, 64 on svamp"
    assert per_task({"gsm8k": 3e-4, "svamp": 1e-3}, "g") == "0.0003 on gsm8k, 0.001 on svamp"
    assert per_task({}) == DASH


def test_loss_weights_are_printed_ntp_contrastive_graph() -> None:
    from magdi.config import LossWeights
    from magdi.report.format import loss_weights

    assert loss_weights(LossWeights()) == "1/0.1/1"
    assert loss_weights(LossWeights(graph=0.1, contrastive=0.01, ntp=2)) == "2/0.01/0.1"
