"""Self-contained HTML pages a reviewer opens from the file system: the MAG browser and the predictions page.

``reports/mags/<task>.html`` shows every built MAG (question, gold, graph type, team answer, the graph as inline
SVG, every node's reasoning); ``reports/predictions/<task>.html`` shows every test question on which the
methods of Table 1 disagree, with each method's output side by side and the (right, wrong) patterns behind
McNemar's test.

Model text is untrusted input. Every string goes through :func:`esc` (``html.escape`` with quotes), the only
script is ours, and a Content-Security-Policy allows exactly that script (by its SHA-256) and nothing else: no
network, no other inline script, no event-handler attributes. Pages need no server and no CDN. Filters are
``<select data-filter=key>`` elements over rows carrying ``data-<key>`` tokens; the URL hash
(``#graph=G1&team=wrong``) sets them at load, so a link (or a headless browser) can open a filtered view.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import Counter
from pathlib import Path

from ..mag import MAG, Node, edges
from .loader import Ctx
from .stats import BEST_SIT, MAGDI, ZERO_SHOT, Comparison, significance

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin:.2em 0}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top;text-align:left}th{background:#f3f3f3}
.row{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:.8em 0}
.ok{color:#1d7a3a;font-weight:600}.bad{color:#b3261e;font-weight:600}.inv{color:#b3261e;font-style:italic}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.4em;margin:.2em 0;max-height:20em;
overflow:auto}details{margin:.15em 0}summary{cursor:pointer}.filters{position:sticky;top:0;background:#fff;
padding:.4em 0;border-bottom:1px solid #ddd}.filters label{margin-right:1em}.muted{color:#666}
svg{max-width:100%}svg text{font:11px system-ui,sans-serif}
"""

FILTER_JS = """(function(){
var sels=[].slice.call(document.querySelectorAll('select[data-filter]'));
var rows=[].slice.call(document.querySelectorAll('.row'));
function apply(){var n=0;rows.forEach(function(r){var ok=sels.every(function(s){if(!s.value)return true;
var v=(r.getAttribute('data-'+s.getAttribute('data-filter'))||'').split(' ');return v.indexOf(s.value)>=0;});
r.hidden=!ok;if(ok)n++;});var c=document.getElementById('shown');if(c)c.textContent=n+' of '+rows.length+' shown';}
var h=new URLSearchParams(location.hash.slice(1));
sels.forEach(function(s){var v=h.get(s.getAttribute('data-filter'));if(v!==null)s.value=v;
s.addEventListener('change',apply);});apply();})();"""

GREEN, RED = "#2e9e4f", "#d1453b"


def esc(x: object) -> str:
    """Every piece of text that reaches a page goes through here (model output is untrusted)."""
    return html.escape("" if x is None else str(x), quote=True)


def _norm(ans: str | None) -> str:
    return "∅" if ans is None else " ".join(str(ans).split()).lower()


def page(title: str, body: str, script: str = FILTER_JS) -> str:
    """One self-contained page: inline CSS, one inline script allowed by hash, nothing else may load or run."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{digest}'"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}<script>{script}</script></body></html>\n")


def _select(key: str, label: str, options: list[tuple[str, str]]) -> str:
    opts = '<option value="">all</option>' + "".join(f'<option value="{esc(v)}">{esc(t)}</option>'
                                                     for v, t in options)
    return f'<label>{esc(label)} <select data-filter="{esc(key)}">{opts}</select></label>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Cells are pre-escaped HTML (callers escape with :func:`esc`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _tokens(xs: list[str]) -> str:
    """A data-attribute value: space-separated tokens (agent/method names never contain spaces)."""
    return esc(" ".join(xs))


# ----------------------------------------------------------------------------- MAG browser


def _agent_nodes(mag: MAG) -> dict[str, list[Node]]:
    by: dict[str, list[Node]] = {}
    for n in sorted(mag.nodes, key=lambda n: n.round):
        by.setdefault(n.agent, []).append(n)
    return by


def agent_summary(mags: list[MAG]) -> dict[str, dict[str, int]]:
    """Per agent: round-0 nodes and how many were right, answer changes between consecutive rounds, and how the
    correctness moved when the answer changed (wrong -> right, right -> wrong), plus invalid replies."""
    out: dict[str, Counter[str]] = {}
    for mag in mags:
        for agent, nodes in _agent_nodes(mag).items():
            c = out.setdefault(agent, Counter())
            c["nodes"] += len(nodes)
            c["invalid"] += sum(not n.valid for n in nodes)
            for n in nodes:
                if n.round == 0:
                    c["round0"] += 1
                    c["round0_right"] += int(n.correct)
            for prev, cur in zip(nodes, nodes[1:], strict=False):
                c["transitions"] += 1
                if _norm(prev.answer) != _norm(cur.answer):
                    c["changed"] += 1
                    c["wrong_to_right"] += int(not prev.correct and cur.correct)
                    c["right_to_wrong"] += int(prev.correct and not cur.correct)
    keys = ("nodes", "invalid", "round0", "round0_right", "transitions", "changed", "wrong_to_right",
            "right_to_wrong")
    return {a: {k: c[k] for k in keys} for a, c in sorted(out.items())}


def mag_svg(mag: MAG, kind: str, anchor: str) -> str:
    """Rounds as columns, agents as rows, green = correct, red = incorrect, dashed thick ring = invalid reply;
    the edges of graph variant ``kind`` (d: arrows round r-1 -> r, ud: the same without direction, fc: all)."""
    agents = sorted({n.agent for n in mag.nodes})
    dx, dy, x0, y0, r = 130, 56, 150, 40, 14
    pos = {i: (x0 + n.round * dx, y0 + agents.index(n.agent) * dy) for i, n in enumerate(mag.nodes)}
    w, h = x0 + mag.n_rounds * dx + 90, y0 + (len(agents) - 1) * dy + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'role="img" aria-label="MAG {esc(mag.id)}">']
    for k in range(mag.n_rounds + 1):
        parts.append(f'<text x="{x0 + k * dx}" y="14" text-anchor="middle">round {k}</text>')
    for j, a in enumerate(agents):
        parts.append(f'<text x="6" y="{y0 + j * dy + 4}">{esc(a[:22])}</text>')
    seen = set()
    for s, d in edges(mag, kind):
        if kind != "d":
            if (d, s) in seen:
                continue
            seen.add((s, d))
        (xa, ya), (xb, yb) = pos[s], pos[d]
        arrow = ' marker-end="url(#arrow)"' if kind == "d" else ""
        if xa == xb:  # same round (fc only): bow out to the left so the edge is not hidden behind nodes
            parts.append(f'<path class="edge" d="M{xa - r} {ya} Q{xa - 45} {(ya + yb) / 2} {xb - r} {yb}" '
                         f'fill="none" stroke="#999" stroke-width="1"/>')
            continue
        ux, uy = xb - xa, yb - ya
        norm = (ux * ux + uy * uy) ** 0.5
        sx, sy, ex, ey = xa + ux / norm * r, ya + uy / norm * r, xb - ux / norm * (r + 3), yb - uy / norm * (r + 3)
        parts.append(f'<line class="edge" x1="{sx:.1f}" y1="{sy:.1f}" x2="{ex:.1f}" y2="{ey:.1f}" stroke="#999" '
                     f'stroke-width="1"{arrow}/>')
    for i, n in enumerate(mag.nodes):
        x, y = pos[i]
        ring = 'stroke="#000" stroke-width="3" stroke-dasharray="4 2"' if not n.valid else \
            'stroke="#333" stroke-width="0.8"'
        tip = (f"{n.agent}, round {n.round}: {n.answer if n.answer is not None else '∅'} (confidence "
               f"{n.confidence:g}){'' if n.valid else ' — INVALID reply'}")
        parts.append(f'<a href="#{anchor}-n{i}"><circle class="node" data-agent="{esc(n.agent)}" '
                     f'data-round="{n.round}" cx="{x}" cy="{y}" r="{r}" fill="{GREEN if n.correct else RED}" {ring}>'
                     f"<title>{esc(tip)}</title></circle></a>")
        if not n.valid:
            parts.append(f'<text x="{x}" y="{y + 4}" text-anchor="middle" fill="#fff">!</text>')
        ans = "∅" if n.answer is None else n.answer
        parts.append(f'<text x="{x}" y="{y + r + 12}" text-anchor="middle">{esc(ans[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _node_details(n: Node, anchor: str) -> str:
    mark = '<span class="ok">right</span>' if n.correct else '<span class="bad">wrong</span>'
    inv = ' <span class="inv">invalid reply (not parsable after retries)</span>' if not n.valid else ""
    ans = esc(n.answer) if n.answer is not None else "∅"
    return (f'<details id="{anchor}"><summary>round {n.round} · {esc(n.agent)} · answer <b>{ans}</b> · '
            f"confidence {esc(f'{n.confidence:g}')} · {mark}{inv} · {n.n_tokens} tokens</summary>"
            f"<pre>{esc(n.reasoning)}</pre></details>")


def _mag_attrs(mag: MAG) -> dict[str, list[str]]:
    by = _agent_nodes(mag)
    return {
        "graph": [mag.graph_type],
        "team": ["none" if mag.team_correct is None else "right" if mag.team_correct else "wrong"],
        "changed": [a for a, ns in by.items() if len({_norm(n.answer) for n in ns}) > 1],
        "r0wrong": [a for a, ns in by.items() if ns[0].round == 0 and not ns[0].correct],
        "finalwrong": [a for a, ns in by.items() if not ns[-1].correct],
        "invalid": [a for a, ns in by.items() if any(not n.valid for n in ns)],
    }


def _data(attrs: dict[str, list[str]]) -> str:
    return " ".join(f'data-{k}="{_tokens(v)}"' for k, v in attrs.items())


def mag_page(task: str, mags: list[MAG], kind: str) -> str:
    summ = agent_summary(mags)
    agents = list(summ)

    def frac(k: int, n: int) -> str:
        return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "—"

    srows = [[esc(a), str(s["nodes"]), frac(s["round0_right"], s["round0"]), frac(s["changed"], s["transitions"]),
              str(s["wrong_to_right"]), str(s["right_to_wrong"]), str(s["invalid"])] for a, s in summ.items()]
    gtypes = sorted({m.graph_type for m in mags}, key=lambda g: int(g[1:]))
    team = Counter(_mag_attrs(m)["team"][0] for m in mags)
    body = [f"<h1>MAG browser · {esc(task)}</h1>",
            f'<p class="muted">{len(mags)} multi-agent interaction graphs built by the teachers on the training '
            f"questions (data/mags/{esc(task)}.jsonl). Graph variant drawn: <b>{esc(kind)}</b> (params "
            "train.graph). Green node = correct answer, red = incorrect, dashed ring with ! = invalid reply. "
            "Click a node to open its reasoning.</p>",
            f"<p>team right: {team['right']}, wrong: {team['wrong']}, no team answer: {team['none']}</p>",
            "<h2>Agents</h2>",
            _table(["agent", "nodes", "round-0 accuracy", "changed answer (of round-to-round steps)",
                    "change wrong → right", "change right → wrong", "invalid replies"], srows)]
    agent_opts = [(a, a) for a in agents]
    body.append('<div class="filters">' + "".join([
        _select("graph", "graph type", [(g, g) for g in gtypes]),
        _select("team", "team", [("right", "right"), ("wrong", "wrong"), ("none", "no team answer")]),
        _select("changed", "agent changed answer", agent_opts),
        _select("r0wrong", "agent wrong at round 0", agent_opts),
        _select("finalwrong", "agent wrong at the end", agent_opts),
        _select("invalid", "agent gave an invalid reply", agent_opts),
    ]) + ' <span id="shown" class="muted"></span></div>')
    for i, mag in enumerate(mags):
        anchor = f"mag-{i}"
        team_txt = ("—" if mag.team_answer is None else esc(mag.team_answer)) + (
            "" if mag.team_correct is None else
            (' <span class="ok">right</span>' if mag.team_correct else ' <span class="bad">wrong</span>'))
        choices = f"<p>choices: {esc(' | '.join(mag.choices))}</p>" if mag.choices else ""
        nodes = "".join(_node_details(n, f"{anchor}-n{j}") for j, n in
                        sorted(enumerate(mag.nodes), key=lambda jn: (jn[1].round, jn[1].agent)))
        body.append(f'<section class="row mag" id="{anchor}" data-id="{esc(mag.id)}" {_data(_mag_attrs(mag))}>'
                    f"<h2>{i + 1}. {esc(mag.id)} · {esc(mag.graph_type)}"
                    f"{' · consensus' if mag.consensus else ''}</h2>"
                    f'<p class="question">{esc(mag.question)}</p>{choices}'
                    f"<p>gold <b>{esc(mag.gold)}</b> · team answer <b>{team_txt}</b></p>"
                    f"{mag_svg(mag, kind, anchor)}{nodes}</section>")
    if not mags:
        body.append("<p>No MAGs built for this task yet.</p>")
    defs = ('<svg width="0" height="0" style="position:absolute"><defs><marker id="arrow" viewBox="0 0 10 10" '
            'refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
            '<path d="M0 0L10 5L0 10z" fill="#999"/></marker></defs></svg>')
    return page(f"MAG browser · {task}", defs + "".join(body))


# ----------------------------------------------------------------------------- predictions page


def disagreements(preds: dict[str, dict[str, dict]]) -> list[str]:
    """Question ids (first method's order) on which the methods' parsed answers or correctness differ."""
    ids = list(dict.fromkeys(i for p in preds.values() for i in p))
    out = []
    for i in ids:
        rows = [p[i] for p in preds.values() if i in p]
        if len({_norm(r.get("parsed")) for r in rows}) > 1 or len({bool(r["correct"]) for r in rows}) > 1:
            out.append(i)
    return out


def _pattern(a: dict | None, b: dict | None) -> str:
    """'rw' = first right, second wrong (etc.); '' when either method lacks the question."""
    if a is None or b is None:
        return ""
    return ("r" if a["correct"] else "w") + ("r" if b["correct"] else "w")


def _two_by_two(c: Comparison) -> str:
    a, b = esc(c.method_a), esc(c.method_b)
    return (f"<h2>{esc(c.comparison)}</h2>" + _table(
        ["", f"{c.method_b} right", f"{c.method_b} wrong"],
        [[f"<b>{a}</b> right", str(c.both_right), f"<b>{c.a_only}</b>"],
         [f"<b>{a}</b> wrong", f"<b>{c.b_only}</b>", str(c.both_wrong)]])
        + f'<p class="muted">n = {c.n}; accuracy {a} {100 * c.acc_a:.1f}% vs {b} {100 * c.acc_b:.1f}%; '
          f"difference {100 * c.diff:+.1f} points, paired bootstrap 95% CI [{100 * c.ci_low:+.1f}, "
          f"{100 * c.ci_high:+.1f}]; McNemar exact p = {c.p_mcnemar:.3g} on the {c.a_only + c.b_only} discordant "
          "questions (bold).</p>")


def predictions_page(ctx: Ctx, task: str) -> str:
    methods = [m for m in ctx.main_methods() if ctx.m.predictions(m, task)]
    preds = {m: ctx.m.predictions(m, task) or {} for m in methods}
    ids = disagreements(preds)
    comps = [c for c in significance(ctx) if c.task == task and c.method_a == MAGDI
             and (c.method_b == ZERO_SHOT or c.comparison.startswith(f"MAGDi vs {BEST_SIT}"))]
    best = next((c.method_b for c in comps if c.comparison.startswith(f"MAGDi vs {BEST_SIT}")), None)
    all_ids = list(dict.fromkeys(i for p in preds.values() for i in p))
    body = [f"<h1>Predictions · {esc(task)}</h1>",
            f'<p class="muted">Test questions on which the methods of Table 1 disagree (parsed answer or '
            f"correctness): {len(ids)} of {len(all_ids)}. Methods with predictions: {esc(', '.join(methods)) or '—'} "
            f"(runs/eval/…/predictions_{esc(task)}.jsonl). Questions on which every method agrees are left out.</p>"]
    body += [_two_by_two(c) for c in comps]
    pat_opts = [("rr", "both right"), ("rw", "MAGDi right, other wrong"), ("wr", "MAGDi wrong, other right"),
                ("ww", "both wrong")]
    filters = [_select("vs_zero_shot", "MAGDi vs zero-shot", pat_opts)] if ZERO_SHOT in preds and MAGDI in preds \
        else []
    if best and MAGDI in preds:
        filters.append(_select("vs_best_sit", f"MAGDi vs best SiT ({best})", pat_opts))
    filters.append(_select("right", "right", [(m, m) for m in methods]))
    body.append('<div class="filters">' + "".join(filters) + ' <span id="shown" class="muted"></span></div>')
    for k, i in enumerate(ids):
        rows = {m: preds[m].get(i) for m in methods}
        first = next(r for r in rows.values() if r is not None)
        q = first.get("question") or "(question text not recorded in this predictions file)"
        attrs = {"vs_zero_shot": [_pattern(rows.get(MAGDI), rows.get(ZERO_SHOT))],
                 "vs_best_sit": [_pattern(rows.get(MAGDI), rows.get(best)) if best else ""],
                 "right": [m for m, r in rows.items() if r is not None and r["correct"]]}
        cells = []
        for m, r in rows.items():
            if r is None:
                cells.append([esc(m), "—", "—", "not evaluated on this question"])
                continue
            ok = '<span class="ok">right</span>' if r["correct"] else '<span class="bad">wrong</span>'
            cells.append([f"<b>{esc(m)}</b>", esc(r.get("parsed")) if r.get("parsed") is not None else "∅ (unparsed)",
                          ok, f"<pre>{esc(r.get('output'))}</pre>"])
        body.append(f'<section class="row pred" id="q-{k}" data-id="{esc(i)}" {_data(attrs)}>'
                    f'<h2>{k + 1}. {esc(i)}</h2><p class="question">{esc(q)}</p>'
                    f"<p>gold <b>{esc(first.get('gold'))}</b></p>"
                    + _table(["method", "parsed answer", "", "output"], cells) + "</section>")
    if not methods:
        body.append("<p>No predictions for this task yet (evaluation not run).</p>")
    return page(f"Predictions · {task}", "".join(body))


def write_pages(ctx: Ctx, out_dir: Path) -> list[Path]:
    """``mags/<task>.html`` and ``predictions/<task>.html`` for every task of Table 1."""
    files = []
    for sub in ("mags", "predictions"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for t in ctx.tasks:
        p = out_dir / "mags" / f"{t}.html"
        p.write_text(mag_page(t, ctx.m.mags(t), ctx.params.train.graph), encoding="utf-8")
        files.append(p)
        p = out_dir / "predictions" / f"{t}.html"
        p.write_text(predictions_page(ctx, t), encoding="utf-8")
        files.append(p)
    return files
