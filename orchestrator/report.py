"""The pipeline's report: per evaluated stage, side by side with each stage's time, the model
family's headline metrics (:func:`vtd_train.train.families.report_columns`): VTDNet's VTDA and its
four group scores (the paper's Table 5 as the user's own run), TaskPrompter's mDS, mIoU and depth
RMSE under the Cityscapes-3D report's rows; ``report.md``, ``report.html`` and ``report.json`` in
the run directory."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from data_pipeline import fsio
from orchestrator.spec import PipelineSpec
from orchestrator.stages import EVAL_PREFIX
from orchestrator.state import RunManifest
from vtd_train.train.families import reference_rows, report_columns


@dataclass(frozen=True)
class Report:
    table: str
    rows: list[dict[str, Any]]
    html: str
    markdown: str


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def report_rows(spec: PipelineSpec, manifest: RunManifest) -> list[dict[str, Any]]:
    """One row per evaluated stage, in pipeline order."""
    rows = []
    for name in spec.stages:
        ev = manifest.stages.get(f"{EVAL_PREFIX}{name}")
        if ev is None or ev.state != "succeeded":
            continue
        rec = manifest.stages[name]
        wall = (rec.ended_at - rec.started_at) if rec.ended_at and rec.started_at else None
        rows.append({"stage": name, "kind": spec.stages[name].kind, **ev.outputs["scores"],
                     "metrics": ev.outputs["metrics"], "seconds": wall, "report": ev.outputs.get("report")})
    return rows


def write_report(spec: PipelineSpec, manifest: RunManifest, run_dir: str) -> Report:
    rows = report_rows(spec, manifest)
    cols = report_columns(spec.family)
    head = ["stage", *(c.header for c in cols), "time"]
    body = [[r["stage"], *(_fmt({**r["metrics"], **r}.get(c.key), c.digits) for c in cols),
             "—" if r["seconds"] is None else f"{r['seconds']:.0f} s"] for r in rows]
    body += [[name, *(_fmt(ref.get(c.key), c.digits) for c in cols), ""] for name, ref in reference_rows(spec.family).items()]
    what = ("VTDA and its group scores" if spec.family == "vtdnet"
            else "mDS (cityscapesscripts), mIoU and depth RMSE (m), under the paper's rows")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    table = "\n".join([line(head), *(line(b) for b in body)])
    md = "\n".join([f"# {spec.name} run {manifest.run} (profile {spec.profile.name})", "", f"{what} per stage, on the validation split.", "",
                    "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    *("| " + " | ".join(b) + " |" for b in body), "",
                    "Per-stage evaluation reports:", "",
                    *(f"- {r['stage']}: {r['report']}" for r in rows if r.get("report"))]) + "\n"
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in b) + "</tr>" for b in body)
    links = "".join(f'<li><a href="{html.escape(str(r["report"]))}">{html.escape(r["stage"])}</a></li>'
                    for r in rows if r.get("report"))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec.name)} {html.escape(manifest.run)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 10px;text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body><h1>{html.escape(spec.name)} run {html.escape(manifest.run)} (profile {html.escape(spec.profile.name)})</h1>"
            f"<p>{html.escape(what)} per stage, on the validation split.</p><table><tr>{cells}</tr>{trs}</table>"
            f"<h2>Per-stage reports</h2><ul>{links}</ul></body></html>")
    md_uri, html_uri = fsio.join(run_dir, "report.md"), fsio.join(run_dir, "report.html")
    fsio.write_bytes_atomic(md_uri, md.encode())
    fsio.write_bytes_atomic(html_uri, page.encode())
    fsio.write_json_atomic(fsio.join(run_dir, "report.json"), {"run": manifest.run, "profile": spec.profile.name, "family": spec.family, "stages": rows})
    return Report(table=table, rows=rows, html=html_uri, markdown=md_uri)
