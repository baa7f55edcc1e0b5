"""`report.html` of `rmdyn attribute`: one self-contained page (figures embedded as base64 PNG, no external file or
script) with the statistics of docs/math.md §10.5, and per eval item the training pairs that push it up and down
with their texts, EX-RM beside IM-RM, and the IM-RM's token pairs (§10.6).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from figures._style import atomic_write

__all__ = ["write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.up { color: #b2182b; } .down { color: #2166ac; }
.item { border-top: 2px solid #999; margin-top: 1.2em; padding-top: 0.4em; }
.cols { display: flex; gap: 1.5em; } .cols > div { flex: 1; min-width: 0; }
img { max-width: 100%; border: 1px solid #eee; }
small { color: #666; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}"><figcaption>{_e(caption)}'
        "</figcaption></figure>"
    )


def _statistics_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    keys = ["spearman_overlap", "spearman_indicator", "spearman_hidden", "indicator_share", "sign_agreement_indicator"]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    rows = []
    for label, res in results.items():
        s = res["statistics"]
        rows.append(f"<tr><th>{_e(label)}</th>" + "".join(f'<td class="num">{_num(s[k])}</td>' for k in keys) + "</tr>")
    table = f"<table><tr><th>reward</th>{head}</tr>{''.join(rows)}</table>"
    sources = {label: res["statistics"].get("source") for label, res in results.items()}
    if any(sources.values()):
        cells = "".join(
            f"<tr><th>{_e(label)}</th><td class='num'>{_num(s['mean_rank'])}</td><td class='num'>"
            f"{_num(s['median_rank'])}</td><td class='num'>{_num(s['top1'])}</td><td class='num'>{_num(s['top5'])}"
            f"</td><td class='num'>{_num(s['chance_mean_rank'])}</td></tr>"
            for label, s in sources.items()
            if s
        )
        table += (
            "<p>Where each eval item ranks the training pair it derives from (train_row):</p><table><tr><th>reward"
            "</th><th>mean rank</th><th>median rank</th><th>top-1</th><th>top-5</th><th>chance mean rank</th></tr>"
            f"{cells}</table>"
        )
    return table


def _item_text(item: Mapping[str, Any]) -> str:
    if "response" in item:
        return f"<b>prompt</b> {_e(_clip(item['prompt']))}<br><b>response</b> {_e(_clip(item['response']))}"
    return (
        f"<b>prompt</b> {_e(_clip(item['prompt']))}<br><b>ȳ+</b> {_e(_clip(item['chosen']))}"
        f"<br><b>ȳ−</b> {_e(_clip(item['rejected']))}"
    )


def _pair_rows(kind: str, js: Sequence[int], C: Sequence[float], train: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for j in js:
        t = train[j]
        out.append(
            f'<tr><td class="num {kind}">{_num(C[j])}</td><td>#{j}</td><td>{_e(_clip(t["prompt"], 90))}</td>'
            f"<td>{_e(_clip(t['chosen'], 90))}</td><td>{_e(_clip(t['rejected'], 90))}</td></tr>"
        )
    return "".join(out) or '<tr><td colspan="5"><small>none</small></td></tr>'


def _item_section(i: int, item, results, train) -> str:
    cols = []
    for label, res in results.items():
        contrib = res["contributions"]
        C = contrib["contribution"][i]
        rank = res["rankings"][i]
        q, pred = contrib["eval_value"][i], sum(C) / len(C)
        cols.append(
            f"<div><h4>{_e(label)}: q = {_num(q)}, predicted Δq = {_num(pred)}</h4><table>"
            "<tr><th>C_ij</th><th>j</th><th>prompt</th><th>chosen</th><th>rejected</th></tr>"
            f"{_pair_rows('up', rank['up'], C, train)}{_pair_rows('down', rank['down'], C, train)}</table></div>"
        )
    columns = "".join(cols)
    return f'<div class="item"><h3>Eval item {i}</h3><p>{_item_text(item)}</p><div class="cols">{columns}</div></div>'


def _token_table(res: Mapping[str, Any], token_text: Callable[[int], str]) -> str:
    parts = []
    C = res["contributions"]["contribution"]
    for key, view in res.get("token_views", {}).items():
        i, j = map(int, key.split(","))
        rows = "".join(
            f"<tr><td>ȳ{_e(t['a'])} k={t['k']} {_e(repr(token_text(t['eval_token'])))}</td>"
            f"<td>y{_e(t['b'])} l={t['l']} {_e(repr(token_text(t['train_token'])))}</td>"
            f'<td class="num">{_num(t["rho"])}</td><td class="num">{_num(t["hidden_dot"])}</td>'
            f'<td class="num">{_num(t["value"])}</td><td>{"yes" if t["identical"] else ""}</td></tr>'
            for t in view["top"]
        )
        parts.append(
            f"<h4>entry (i, j) = ({_e(key)}): C_ij = {_num(C[i][j])}, of which through W: C^W = {_num(view['total'])};"
            f" identical tokens {_num(view['indicator'])}"
            f" (share {_num(view['indicator_share'])}), rest {_num(view['rest'])}</h4><table><tr><th>eval token</th>"
            "<th>training token</th><th>ρ</th><th>⟨h, h'⟩</th><th>term</th><th>identical</th></tr>"
            f"{rows}</table>"
        )
    return "".join(parts)


def _run_section(run: Mapping[str, Any]) -> str:
    traj = run["trajectory"]
    meta = run["run"]["meta"]
    parting = traj.get("skipped") or (
        f"first checkpoint where the linearised trajectory is off by more than {traj['tolerance']:g} of the largest "
        f"actual change: {traj['parting_step'] if traj['parting_step'] is not None else 'none (it never parts)'}"
    )
    return (
        f"<h2>Along the run {_e(meta.get('run_dir', ''))} ({_e(run['reward'])})</h2><p>Predicted total change "
        f"(the per-step contributions summed over {len(run['run']['checkpoint_steps'])} checkpoints) against the "
        f"actual change of each eval item: Pearson {_num(run['run']['pearson'])}. {_e(parting)}.</p>"
    )


def write_report(
    path: str | os.PathLike[str],
    data: Mapping[str, Any],
    images: Sequence[tuple[Path, str]],
    token_text: Callable[[int], str],
    *,
    max_items: int = 50,
) -> Path:
    """Write the self-contained report page.

    Args:
      path: the .html file.
      data: the attribution.json content: "results" (label → `Attribution.to_dict()`), "train" and "eval" (texts),
        "options", "model".
      images: (PNG path, caption) of each figure, embedded in that order.
      token_text: renders a token id.
      max_items: eval items shown in detail (the JSON has all).
    """
    results, train, items = data["results"], data["train"]["rows"], data["eval"]["rows"]
    opts = ", ".join(f"{k} = {v}" for k, v in data["options"].items())
    body = [
        "<h1>rmdyn attribute</h1>",
        f"<p>Model {_e(data['model'].get('name', ''))}; {len(train)} training pairs, {len(items)} eval items "
        f"({_e(data['eval']['kind'])}); {_e(opts)}.</p>",
        "<p>C_ij = η w_j ⟨∇q_i, ∇r(x_j,y_j+) − ∇r(x_j,y_j−)⟩: how much training pair j moves eval quantity q_i in "
        "one SGD step (positive: up). The mean over j is the first-order change of a full-batch step.</p>",
        "<h2>Token overlap vs hidden similarity</h2>",
        _statistics_table(results),
    ]
    body += [_image(p, c) for p, c in images]
    if data.get("run"):
        body.append(_run_section(data["run"]))
    if any(res.get("token_views") for res in results.values()):
        body.append("<h2>IM-RM token pairs of the largest contributions (unembedding closed form)</h2>")
        for res in results.values():
            body.append(_token_table(res, token_text))
    body.append("<h2>Per eval item: the training pairs that push it up and down</h2>")
    body += [_item_section(i, items[i], results, train) for i in range(min(max_items, len(items)))]
    if len(items) > max_items:
        body.append(f"<p><small>{len(items) - max_items} more eval items in attribution.json.</small></p>")
    page = f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>rmdyn attribute</title><style>{_CSS}</style>'
    page += f"</head><body>{''.join(body)}</body></html>\n"
    out = Path(path)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out
