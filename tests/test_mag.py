"""MAG data model (``magdi.mag``): edge counts by hand, absent rounds, PyG conversion, crash-safe JSONL
storage, the importer of the official release format, Table-12 statistics and the Fig. 2 drawing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from magdi.mag import (
    LOOP_RATIO,
    MAG,
    Node,
    append_mag,
    draw_mag,
    edges,
    iter_mags,
    length_stats,
    mag_stats,
    read_mags,
    tail_compression,
    to_pyg,
    write_mags,
)
from magdi.official import clean_mag, import_official, remove_agreement  # noqa: E402

AGENTS = ("a", "b", "c")


def _node(agent: str, rnd: int, answer: str | None = "5", correct: bool = True, **kw) -> Node:
    return Node(agent=agent, round=rnd, reasoning=f"{agent} thinks in round {rnd}", answer=answer,
                confidence=0.9, correct=correct, **kw)


def _mag(n_rounds: int, mag_id: str = "q0", agents: tuple[str, ...] = AGENTS) -> MAG:
    """3 agents, rounds 0..n_rounds; agent 'b' is wrong in round 0, everyone right afterwards."""
    nodes = [_node(a, r, "6" if (a == "b" and r == 0) else "5", not (a == "b" and r == 0))
             for r in range(n_rounds + 1) for a in agents]
    return MAG(id=mag_id, task="gsm8k", question="What is 2 plus 3?", gold="5", nodes=nodes,
               team_answer="5", team_correct=True, consensus=True)


# ------------------------------------------------------------------------------ lengths and loops
def test_tail_compression_tells_loops_from_reasoning() -> None:
    import zlib

    assert tail_compression("") == 1.0
    text = "x" * 10 + "abc" * 300  # only the last 600 characters count: the prefix is cut away
    tail = ("abc" * 300)[-600:].encode()
    assert tail_compression(text) == len(zlib.compress(tail, 9)) / 600
    counting = " ".join(f"The answer is {i}." for i in range(40, 90))  # a loop whose number changes
    assert tail_compression(counting) < LOOP_RATIO
    assert tail_compression("8" * 2000) < 0.05
    reasoning = ("Marion got 6 more than half of Ella's score. Ella got 4 of 40 items wrong, so she scored "
                 "40 - 4 = 36. Half of 36 is 18, and 18 + 6 = 24, so Marion scored 24. The first row has 7 "
                 "seats and every later row has 3 more, so the fifth row holds 7 + 4 * 3 = 19 seats; with "
                 "12 rows the hall seats 12 * 7 + 3 * 66 = 282 people. Jo buys 3 pens at $2 and 2 pads at "
                 "$5, paying 6 + 10 = 16 dollars, and gets 4 dollars back from a 20 dollar note.")
    assert len(reasoning) >= 300 and tail_compression(reasoning) > LOOP_RATIO


def test_length_stats_splits_cut_replies_into_loops_and_unfinished_reasoning() -> None:
    a = [_node("a", 0, n_tokens=n, tail_compression=c) for n, c in ((10, 0.05), (50, 0.1), (50, 0.45), (50, None))]
    b = [_node("b", 0, n_tokens=n) for n in (5, 7)]
    m = MAG(id="q", task="gsm8k", question="?", gold="5", nodes=a + b)
    st = length_stats([m], {"a": 50, "b": 100})
    pa = st["per_agent"]["a"]
    assert (pa["n"], pa["median"], pa["max"], pa["limit"]) == (4, 50, 50, 50)
    assert pa["truncated_fraction"] == 0.75  # three replies reached the limit
    # one of them loops (0.1); 0.45 compresses like reasoning; None (not measured) is not counted as a loop;
    # the short reply that loops (0.05) ended before the limit, so it is not cut at all
    assert pa["looping_fraction"] == 0.25 and pa["cut_reasoning_fraction"] == 0.5
    assert st["per_agent"]["b"]["truncated_fraction"] == 0.0 and st["per_agent"]["b"]["looping_fraction"] == 0.0
    assert st["truncated_fraction"] == pytest.approx(3 / 6) and st["looping_fraction"] == pytest.approx(1 / 6)
    assert st["cut_reasoning_fraction"] == pytest.approx(2 / 6)


def test_mag_json_without_tail_compression_still_reads() -> None:
    """MAG files written before ``Node.tail_compression`` existed load with None; a wrong type is refused."""
    d = _mag(1).to_json()
    for n in d["nodes"]:
        n.pop("tail_compression")
    assert MAG.from_json(d).nodes[0].tail_compression is None
    d["nodes"][0]["tail_compression"] = "high"
    with pytest.raises(TypeError, match="tail_compression"):
        MAG.from_json(d)


# ----------------------------------------------------------------------------------------- edges
@pytest.mark.parametrize(("n_rounds", "n_nodes", "n_d"), [(0, 3, 0), (1, 6, 9), (2, 9, 18), (3, 12, 27)])
def test_edge_counts_three_agents(n_rounds: int, n_nodes: int, n_d: int) -> None:
    m = _mag(n_rounds)
    assert len(m.nodes) == n_nodes
    assert m.n_rounds == n_rounds and m.graph_type == f"G{n_rounds}"
    d = edges(m, "d")
    assert len(d) == n_d
    assert len(set(d)) == n_d  # no duplicates
    ud = edges(m, "ud")
    assert len(ud) == 2 * n_d
    assert set(ud) == set(d) | {(j, i) for i, j in d}
    fc = edges(m, "fc")
    assert len(fc) == n_nodes * (n_nodes - 1)
    assert all(i != j for i, j in fc)
    assert edges(m) == d  # default kind is d


def test_d_edges_go_only_from_round_r_minus_1_to_round_r() -> None:
    m = _mag(3)
    d = edges(m, "d")
    for s, t in d:
        assert m.nodes[t].round == m.nodes[s].round + 1
    # and every such pair is present: each round-r node saw every round r-1 node
    expected = {(i, j) for i, u in enumerate(m.nodes) for j, v in enumerate(m.nodes) if v.round == u.round + 1}
    assert set(d) == expected


def test_unknown_graph_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="graph kind"):
        edges(_mag(1), "full")


def test_consensus_at_round_1_gives_smaller_graph_without_placeholders() -> None:
    # agents agreed after one round of discussion: rounds 2 and 3 did not happen -> absent, not "None" nodes
    m = _mag(1)
    assert len(m.nodes) == 6
    assert {n.round for n in m.nodes} == {0, 1}
    assert all(n.reasoning not in ("None", "NA") and n.answer is not None for n in m.nodes)
    assert m.graph_type == "G1"
    assert len(edges(m, "d")) == 9
    assert len(edges(m, "fc")) == 30


def test_missing_agent_in_a_round_changes_edges_accordingly() -> None:
    # round 1 has only agents a and b: 3 round-0 nodes x 2 round-1 nodes
    m = _mag(0)
    m.nodes += [_node("a", 1), _node("b", 1)]
    assert len(edges(m, "d")) == 6
    assert sorted(edges(m, "d")) == [(i, j) for i in range(3) for j in (3, 4)]


# ----------------------------------------------------------------------------------------- PyG
def test_to_pyg_shapes_and_labels() -> None:
    m = _mag(2)
    data = to_pyg(m, "d")
    assert data.num_nodes == 9
    assert tuple(data.edge_index.shape) == (2, 18)
    assert [tuple(e) for e in data.edge_index.t().tolist()] == edges(m, "d")
    # b is wrong in round 0 only
    assert data.y.tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert tuple(to_pyg(m, "ud").edge_index.shape) == (2, 36)
    assert tuple(to_pyg(m, "fc").edge_index.shape) == (2, 72)


def test_to_pyg_without_edges() -> None:
    data = to_pyg(_mag(0))
    assert tuple(data.edge_index.shape) == (2, 0)
    assert data.num_nodes == 3
    assert data.y.tolist() == [1, 0, 1]


def test_to_pyg_batches_variable_sizes() -> None:
    from torch_geometric.data import Batch

    b = Batch.from_data_list([to_pyg(_mag(0)), to_pyg(_mag(3))])
    assert b.num_nodes == 3 + 12
    assert b.edge_index.shape[1] == 0 + 27
    assert b.edge_index.min().item() >= 3  # the G3 graph's edges were shifted past the G0 graph's nodes


# ----------------------------------------------------------------------------------------- storage
def test_write_read_roundtrip(tmp_path: Path) -> None:
    invalid = _mag(1, "q1")
    invalid.nodes[1] = Node("b", 0, "garbled ✗ reply", None, 0.0, False, n_tokens=7, valid=False)
    invalid.choices = ["bank", "river"]
    invalid.meta = {"explanation_available": True}
    mags = [_mag(0, "q0"), invalid, _mag(3, "q2")]
    path = tmp_path / "sub" / "mags.jsonl"
    write_mags(path, mags)
    assert read_mags(path) == mags
    assert not path.with_suffix(".jsonl.tmp").exists()
    # append keeps what is there
    append_mag(path, _mag(2, "q3"))
    back = read_mags(path)
    assert [m.id for m in back] == ["q0", "q1", "q2", "q3"]
    assert back[1].nodes[1].valid is False and back[1].nodes[1].answer is None


def test_read_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_mags(tmp_path / "nope.jsonl") == []


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "mags.jsonl"
    write_mags(path, [_mag(0, "q0"), _mag(1, "q1")])
    full = json.dumps(_mag(2, "q2").to_json())
    with path.open("a") as f:
        f.write(full[: len(full) // 2])  # killed mid-write: no closing brace, no newline
    assert [m.id for m in read_mags(path)] == ["q0", "q1"]
    with pytest.raises(ValueError, match=r"mags\.jsonl:3"):
        list(iter_mags(path, strict=True))


def test_append_after_torn_line_starts_a_clean_line(tmp_path: Path) -> None:
    # a run killed mid-append, then resumed: the new record must not be glued onto the torn one
    path = tmp_path / "mags.jsonl"
    write_mags(path, [_mag(0, "q0")])
    full = json.dumps(_mag(1, "q1").to_json())
    with path.open("a") as f:
        f.write(full[:40])
    append_mag(path, _mag(2, "q2"))
    append_mag(path, _mag(3, "q3"))
    assert [m.id for m in read_mags(path)] == ["q0", "q2", "q3"]
    assert len(path.read_text().splitlines()) == 3


def test_append_after_record_missing_only_its_newline_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "mags.jsonl"
    path.write_text(json.dumps(_mag(0, "q0").to_json()))  # complete record, killed before the newline
    append_mag(path, _mag(1, "q1"))
    assert [m.id for m in read_mags(path)] == ["q0", "q1"]


def test_bad_middle_line_errors_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mags.jsonl"
    lines = [json.dumps(_mag(0, "q0").to_json()), '{"id": "q1", "nodes": [', json.dumps(_mag(0, "q2").to_json())]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2"):
        read_mags(path)


def test_valid_json_that_is_not_a_mag_errors_even_on_last_line(tmp_path: Path) -> None:
    path = tmp_path / "mags.jsonl"
    path.write_text(json.dumps(_mag(0, "q0").to_json()) + "\n" + '{"id": "q1"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2"):
        read_mags(path)


# ----------------------------------------------------------------------------------------- importer
def _official_records() -> list[dict]:
    """Two questions in the authors' release format (agents claude, gpt4, bard; rounds 0..3)."""
    disc = {
        "question": "Tom has 3 apples and buys 15 more. How many apples?",
        "gold_answer": "18",
        "claude_output_0": {"reasoning": "3 + 15 = 18", "answer": "18", "confidence_level": 0.9},
        "gpt4_output_0": {"reasoning": "3 + 15 = 17", "answer": "17", "confidence_level": 0.8,
                          "label": 1},  # a wrong stored label: must be re-derived, not trusted
        "bard_output_0": {"reasoning": "3 + 15 is 18.0", "answer": "18.0"},  # no confidence given
        "claude_output_1": {"reasoning": "still 18", "answer": "18", "confidence_level": 0.95},
        "gpt4_output_1": {"reasoning": "I was wrong, 18", "answer": "18", "confidence_level": 0.9},
        "bard_output_1": {"reasoning": "NA", "answer": "NA"},  # official padding: no node
        # round 2: the official placeholder of a round that did not happen
        "claude_output_2": {"reasoning": "None", "answer": "None"},
        "gpt4_output_2": "None",
        "bard_output_2": {"reasoning": "None", "answer": "None"},
        # round 3: absent altogether
    }
    agreed = {
        "question": "What is 2 plus 3?",
        "gold_answer": "5",
        "claude_output_0": {"reasoning": "2+3=5", "answer": "5", "confidence_level": 1.0},
        "gpt4_output_0": {"reasoning": "five", "answer": 5, "confidence_level": 0.9},
        "bard_output_0": {"reasoning": "it is 5", "answer": "5", "confidence_level": 0.7},
    }
    return [disc, agreed]


def test_import_official_absent_rounds_and_rederived_labels() -> None:
    mags = import_official(_official_records(), task="gsm8k", answer_type="number")
    assert len(mags) == 2
    disc, agreed = mags
    assert disc.id == "gsm8k-official-00000" and agreed.id == "gsm8k-official-00001"
    assert disc.gold == "18" and disc.meta == {"source": "official_release"}
    # round 0: bard, claude, gpt4 (sorted agents); round 1: claude, gpt4 (bard's "NA" is no node)
    assert [(n.agent, n.round) for n in disc.nodes] == [
        ("bard", 0), ("claude", 0), ("gpt4", 0), ("claude", 1), ("gpt4", 1)]
    assert [n.correct for n in disc.nodes] == [True, True, False, True, True]  # "18.0" == 18; gpt4 r0 wrong
    assert [n.answer for n in disc.nodes] == ["18.0", "18", "17", "18", "18"]
    assert [n.confidence for n in disc.nodes] == [0.0, 0.9, 0.8, 0.95, 0.9]
    assert all(n.reasoning not in ("None", "NA") for n in disc.nodes)
    assert disc.graph_type == "G1"
    assert len(edges(disc, "d")) == 3 * 2
    # consensus at round 0: 3 nodes, all positive, and no "NA" negative is invented
    assert [(n.agent, n.round) for n in agreed.nodes] == [("bard", 0), ("claude", 0), ("gpt4", 0)]
    assert all(n.correct for n in agreed.nodes)
    assert agreed.nodes[2].answer == "5"  # a numeric JSON answer is kept as text
    assert agreed.graph_type == "G0" and edges(agreed) == []


def test_import_official_roundtrips_through_storage(tmp_path: Path) -> None:
    mags = import_official(_official_records(), task="gsm8k", answer_type="number")
    path = tmp_path / "official.jsonl"
    write_mags(path, mags)
    assert read_mags(path) == mags


def test_import_official_yesno_and_explicit_id() -> None:
    rec = {"id": "sqa-7", "question": "Is water wet?", "gold_answer": True,
           "claude_output_0": {"reasoning": "yes it is", "answer": "yes"},
           "gpt4_output_0": {"reasoning": "no", "answer": "no"},
           "bard_output_0": {"reasoning": "hmm", "answer": "None"}}  # a node without an answer: wrong
    (m,) = import_official([rec], task="strategyqa", answer_type="yesno")
    assert m.id == "sqa-7" and m.gold == "yes"
    assert [(n.agent, n.answer, n.correct) for n in m.nodes] == [
        ("bard", None, False), ("claude", "yes", True), ("gpt4", "no", False)]


# ----------------------------------------------------------------------------------------- statistics
def test_mag_stats_by_hand() -> None:
    # MAG 1 (G1): r0 a+ b- c+, r1 a+ b+ c-
    m1 = MAG("m1", "gsm8k", "q", "5", [
        _node("a", 0), _node("b", 0, "6", False), _node("c", 0),
        _node("a", 1), _node("b", 1), _node("c", 1, "7", False)])
    # MAG 2 (G0): a+ b (invalid, unparseable) c+ ; consensus impossible but we only count here
    m2 = MAG("m2", "gsm8k", "q", "5", [_node("a", 0), _node("b", 0, None, False, valid=False), _node("c", 0)])
    # MAG 3 (G0): all correct -> no negatives
    m3 = MAG("m3", "gsm8k", "q", "5", [_node("a", 0), _node("b", 0), _node("c", 0)])
    s = mag_stats([m1, m2, m3])
    assert s["n_mags"] == 3
    assert s["n_nodes"] == 12
    assert s["positive_nodes"] == 4 + 2 + 3
    assert s["negative_nodes"] == 2 + 1
    assert s["invalid_nodes"] == 1
    assert s["nodes_per_round"] == {"round_0": 9, "round_1": 3}
    assert s["nodes_per_agent"] == {"a": 4, "b": 4, "c": 4}
    assert s["agent_node_accuracy"] == {"a": 1.0, "b": pytest.approx(2 / 4), "c": pytest.approx(3 / 4)}
    assert s["graph_types"] == {"G0": 2, "G1": 1, "G2": 0, "G3": 0}
    assert s["mags_with_pos_and_neg"] == 2


def test_mag_stats_empty() -> None:
    s = mag_stats([])
    assert s["n_mags"] == 0 and s["n_nodes"] == 0
    assert s["graph_types"] == {"G0": 0, "G1": 0, "G2": 0, "G3": 0}


# ----------------------------------------------------------------------------------------- drawing
@pytest.mark.parametrize("n_rounds", [0, 2])
def test_draw_mag_writes_png(tmp_path: Path, n_rounds: int) -> None:
    m = _mag(n_rounds)
    m.nodes[1] = Node("b", 0, "garbled", None, 0.0, False, valid=False)
    out = tmp_path / "fig" / f"mag{n_rounds}.png"
    draw_mag(m, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 1000


def test_import_official_ecqa_option_numbers_and_team_vote() -> None:
    """Official ECQA MAGs answer with digits 1-5: imported as letters, with the options split off the question."""
    rec = {"question": "Where do fish live? 1. tree 2. sea 3. shop 4. car 5. desk", "gold_answer": "2",
           "claude_output_0": {"reasoning": "Fish swim in the sea.", "answer": "2", "confidence_level": 0.9},
           "gpt4_output_0": {"reasoning": "Shops sell fish.", "answer": "3", "confidence_level": 0.7},
           "bard_output_0": {"reasoning": "The sea.", "answer": "2", "confidence_level": 0.95},
           "claude_output_1": {"reasoning": "I agree with gpt4. Still the sea", "answer": "2",
                               "confidence_level": 1.0},
           "gpt4_output_1": {"reasoning": "I disagree with myself. It is the sea", "answer": "2",
                             "confidence_level": 0.9},
           "bard_output_1": {"reasoning": "Sea", "answer": "B", "confidence_level": 0.9}}
    (m,) = import_official([rec], task="ecqa", answer_type="choice")
    assert m.gold == "B"
    assert (m.question, m.choices) == ("Where do fish live?", ["tree", "sea", "shop", "car", "desk"])
    assert [n.answer for n in m.nodes] == ["B", "B", "C", "B", "B", "B"]  # digits read as the evaluation's letters
    assert [n.correct for n in m.nodes] == [True, True, False, True, True, True]
    assert m.team_answer == "B" and m.team_correct is True and m.consensus is True
    assert m.nodes[4].reasoning == "I agree with gpt4. Still the sea"
    (clean,) = import_official([rec], task="ecqa", answer_type="choice", clean_agreement=True)
    assert [n.reasoning for n in clean.nodes if n.round == 1] == ["Sea", "Still the sea", "It is the sea"]
    assert clean_mag(m) == replace(clean, nodes=[replace(a, n_tokens=b.n_tokens)
                                                 for a, b in zip(clean.nodes, m.nodes, strict=True)])


def test_remove_agreement_as_official() -> None:
    assert remove_agreement("I agree with A. 2 + 3 = 5. I disagree with B. So 5") == "2 + 3 = 5. So 5"
    assert remove_agreement("We agree. I agreed earlier") == "We agree"  # startswith, as the official code
    assert remove_agreement("no such sentence") == "no such sentence"
