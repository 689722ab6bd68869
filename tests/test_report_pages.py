"""The HTML pages: per-agent summary by hand, untrusted model text stays text, size at the default sizes, and a
real headless Chromium renders them (DOM after scripts ran, a filter from the URL hash, a screenshot)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from magdi.mag import MAG, Node, write_mags
from magdi.report import build_report
from magdi.report.pages import FILTER_JS, agent_summary, mag_page
from test_report import _mags, _params, paired_tree  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
# A reasoning that would run code, load an image with a handler, and swallow the page, if it were markup.
HOSTILE = ('<script>document.body.setAttribute("data-pwned","1")</script>'
           '<img src=x onerror="document.body.setAttribute(\'data-pwned\',\'2\')">'
           ' and then <div title="unterminated')


def _hostile_mag() -> MAG:
    return MAG("evil", "strategyqa", "Is <u>this</u> underlined?", "yes",
               [Node("a", 0, HOSTILE, "<img src=y onerror=alert(1)>", 0.5, False, 7, valid=False),
                Node("b", 0, "plain", "yes", 0.9, True, 3)], team_answer="<i>", team_correct=False)


# ----------------------------------------------------------------------------- pure Python


def test_agent_summary_hand_counted() -> None:
    s = agent_summary(_mags())
    # a: round 0 right on s0, s2, wrong on s1; in s1 it says yes, yes, then no (wrong -> right) at round 2
    assert s["a"] == {"nodes": 5, "invalid": 0, "round0": 3, "round0_right": 2, "transitions": 2, "changed": 1,
                      "wrong_to_right": 1, "right_to_wrong": 0}
    # b: round 0 right on s0, s1, wrong on s2; never changes its answer
    assert s["b"] == {"nodes": 5, "invalid": 0, "round0": 3, "round0_right": 2, "transitions": 2, "changed": 0,
                      "wrong_to_right": 0, "right_to_wrong": 0}


class _Doc(HTMLParser):
    """Every element with its attributes, the script bodies, and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def _parse(html: str) -> _Doc:
    d = _Doc()
    d.feed(html)
    d.close()
    return d


def test_model_text_is_escaped_and_only_our_script_may_run() -> None:
    html = mag_page("strategyqa", [*_mags(), _hostile_mag()], "d")
    doc = _parse(html)
    assert doc.scripts == [FILTER_JS]
    assert not [t for t, _ in doc.tags if t in ("img", "u", "i", "iframe", "object")]
    assert not [(t, k) for t, a in doc.tags for k in a if k.startswith("on")]
    text = "".join(doc.text)
    assert HOSTILE in text and "Is <u>this</u> underlined?" in text and "<img src=y onerror=alert(1)>" in text
    # the CSP allows exactly our script, by hash; nothing may be fetched
    digest = base64.b64encode(hashlib.sha256(FILTER_JS.encode()).digest()).decode()
    csp = next(a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    # the unterminated tag did not swallow what follows: every node of every MAG is still there
    assert sum(1 for t, a in doc.tags if t == "circle" and a.get("class") == "node") == 2 + 6 + 2 + 2
    assert sum(1 for t, a in doc.tags if t == "details") == 12


def test_mag_page_records_graph_and_filter_attributes() -> None:
    doc = _parse(mag_page("strategyqa", _mags(), "d"))
    secs = {a["data-id"]: a for t, a in doc.tags if t == "section"}
    assert secs["s1"]["data-graph"] == "G2" and secs["s1"]["data-changed"] == "a"
    assert secs["s2"]["data-team"] == "wrong" and secs["s2"]["data-r0wrong"] == "b"
    assert secs["s0"]["data-graph"] == "G0" and secs["s0"]["data-team"] == "right"
    # d edges: s1 has 2 + 2 rounds of 2x2 -> 8 arrows, the G0 MAGs none
    assert sum(1 for t, a in doc.tags if t == "line" and a.get("class") == "edge") == 8
    fc = _parse(mag_page("strategyqa", _mags()[1:2], "fc"))  # 6 nodes, every unordered pair once
    assert sum(1 for t, a in fc.tags if t in ("line", "path") and a.get("class") == "edge") == 15


def test_mag_page_size_at_the_default_sizes_is_small() -> None:
    """params.yaml sizes (n_train MAGs of len(agents) x (max_rounds + 1) nodes: every discussion runs all
    rounds), each reasoning at its longest: max_new_tokens tokens of ~4 characters (English text in these
    tokenizers; the real pages' sizes are listed in reports/README.md). Escaping cost is bounded separately:
    an all-'<' reasoning costs 4 bytes a character plus a bounded per-node overhead."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    agents = [a["name"] for a in p["teachers"]["agents"]]
    chars = 4 * max(a.get("max_new_tokens", 64) for a in p["teachers"]["agents"])
    rounds = range(p["teachers"]["max_rounds"] + 1)

    def mags(text: str, n: int) -> list[MAG]:
        return [MAG(f"m{i}", "t", "Q" * 300, "yes", [Node(a, r, text, "yes", 0.5, r % 2 == 0, 64)
                                                     for r in rounds for a in agents]) for i in range(n)]

    size = len(mag_page("t", mags("word " * (chars // 5), p["data"]["n_train"]), "fc").encode())
    assert size < 5 * 2**20
    hostile = mags("<" * chars, 8)
    per_node = len(mag_page("t", hostile, "fc").encode()) / (len(hostile) * len(hostile[0].nodes))
    assert per_node < 4 * chars + 2000  # escaped text ('&lt;' = 4 bytes) plus a bounded per-node overhead


def test_predictions_page_lists_disagreements_and_discordant_counts(tmp_path: Path) -> None:
    metrics, mags_dir, runs = paired_tree(tmp_path)
    out = tmp_path / "reports"
    build_report(_params(), out, metrics, mags_dir, runs)
    doc = _parse((out / "predictions" / "strategyqa.html").read_text())
    secs = [a for t, a in doc.tags if t == "section"]
    # q0, q1 all right, q8, q9 all wrong with the same answer: agreements, left out
    assert [a["data-id"] for a in secs] == [f"q{i}" for i in range(2, 8)]
    assert all(a["data-vs_zero_shot"] == "rw" for a in secs)
    assert [a["data-vs_best_sit"] for a in secs] == ["rr"] * 5 + ["rw"]
    text = " ".join("".join(doc.text).split())
    assert "McNemar exact p = 0.0312 on the 6 discordant questions" in text
    assert "Question 7?" in text and "The answer is yes." in text
    assert "MAGDi vs best SiT student" in text


# ----------------------------------------------------------------------------- headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's `chromium`)")
def test_pages_in_headless_chromium(tmp_path: Path) -> None:
    metrics, mags_dir, runs = paired_tree(tmp_path)
    write_mags(mags_dir / "strategyqa.jsonl", [*_mags(), _hostile_mag()])
    out = tmp_path / "reports"
    build_report(_params(), out, metrics, mags_dir, runs)
    page = (out / "mags" / "strategyqa.html").as_uri()

    dom = _chromium(tmp_path, page, "--dump-dom")
    doc = _parse(dom)
    body = next(a for t, a in doc.tags if t == "body")
    assert "data-pwned" not in body  # neither the <script> nor the onerror handler ran
    assert not [t for t, _ in doc.tags if t in ("img", "u", "i")]
    assert not [(t, k) for t, a in doc.tags for k in a if k.startswith("on")]
    text = "".join(doc.text)
    assert HOSTILE in text and "Can pigs fly?" in text
    # the graph of s1 (2 agents x 3 rounds) has 6 nodes, counted in the rendered DOM
    s1 = dom[dom.index('data-id="s1"'):]
    s1 = s1[: s1.index("</section>")]
    assert len(re.findall(r'<circle class="node"', s1)) == 6
    assert '4 of 4 shown' in dom  # our script ran: the counter is filled in, nothing hidden

    # a filter from the URL hash hides the rows that do not match: only s1 has an agent that changed its answer
    doc = _parse(_chromium(tmp_path, page + "#changed=a", "--dump-dom"))
    hidden = {a["data-id"]: "hidden" in a for t, a in doc.tags if t == "section"}
    assert hidden == {"s0": True, "s1": False, "s2": True, "evil": True}

    pred = _parse(_chromium(tmp_path, (out / "predictions" / "strategyqa.html").as_uri() + "#vs_best_sit=rw",
                            "--dump-dom"))
    assert [a["data-id"] for t, a in pred.tags if t == "section" and "hidden" not in a] == ["q7"]

    shots = Path(os.environ.get("MAGDI_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for name, url in (("mags", page), ("predictions", (out / "predictions" / "strategyqa.html").as_uri())):
        png = shots / f"{name}_strategyqa.png"
        _chromium(tmp_path, url, f"--screenshot={png}", "--window-size=1200,1400", "--hide-scrollbars")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
