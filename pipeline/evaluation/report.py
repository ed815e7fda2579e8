"""report.html: one self-contained static page per evaluation (images inlined), opened by a browser without a
server."""

import base64
import html
import math
from pathlib import Path

from pipeline.core.files import atomic
from pipeline.evaluation.metrics import EMPTY_RULES, METRICS

# Click a column heading to sort the per-case table; on load the page counts the images that decoded (a test reads it).
SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].textContent, v = parseFloat(t); return isNaN(v) ? t : v; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
}
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.imagesDecoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.caseRows = document.querySelectorAll('#cases tbody tr').length;
});
"""

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } \
td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f4f4f4; } #source th, #source td { text-align: left; }
#cases th { cursor: pointer; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } figure { display: inline-block; margin: 0 1em 1em 0; } .note { color: #666; max-width: 60em; }
"""


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def _listed(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def write(path: Path, rows: list[dict], summary: dict, source: dict, overlays: dict[str, Path],
          curves: Path | None = None) -> Path:
    """rows: per case and class (as per_case.csv); summary: metrics.summarize(); overlays: case id -> PNG."""
    classes = list(summary["classes"])
    summary_rows = "".join(
        f"<tr><td>{m}</td>" + "".join(
            f"<td>{_cell(s['mean'])} &plusmn; {_cell(s['std'])} "
            f"<small>(median {_cell(s['median'])}, n {s['n']})</small></td>"
            for s in (summary["classes"][c][m] for c in classes)) + f"<td>{_cell(summary['mean'][m])}</td></tr>"
        for m in METRICS)
    columns = ["case", "class", *METRICS, "empty"]
    case_rows = "".join("<tr>" + "".join(f"<td>{_cell(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    empty = ", ".join(f"{c}: truth {e['truth']}, prediction {e['pred']}, both {e['both']}"
                      for c, e in summary["empty"].items())
    sources = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_listed(v))}</td></tr>" for k, v in source.items()
                      if k != "name")
    pictures = "".join(_image(p, f"{case} (mean Dice {score:.3f})") for case, (p, score) in overlays.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(source.get('name', ''))}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head><body>
<h1>Evaluation: {html.escape(source.get('name', ''))}</h1>
<table id="source"><tbody>{sources}</tbody></table>
<h2>Summary over {summary['cases']} cases</h2>
<table id="summary"><thead><tr><th>metric</th>{''.join(f'<th>{html.escape(c)}</th>' for c in classes)}\
<th>mean over classes</th></tr></thead>
<tbody>{summary_rows}</tbody></table>
<p class="note">Empty structures (cases per class): {html.escape(empty)}. {html.escape(EMPTY_RULES)}
Surface Dice (NSD) at {summary['tolerance_mm']} mm. Distances and volumes use the voxel spacing.</p>
{'<h2>Training curves</h2>' + _image(curves, 'loss, validation Dice, learning rate') if curves else ''}
<h2>Worst cases</h2>
{pictures or '<p>none drawn (overlays=0)</p>'}
<h2>Per case and class</h2>
<p class="note">Click a heading to sort.</p>
<table id="cases"><thead><tr>{''.join(f'<th onclick="sortBy(this)">{c}</th>' for c in columns)}</tr></thead>
<tbody>{case_rows}</tbody></table>
</body></html>
"""
    with atomic(path) as tmp:
        tmp.write_text(page)
    return Path(path)
