"""Tables of a markdown document redrawn from stored study results, so a document's numbers
come from one command (``curvinf fill-tables DOC``) rather than by hand.

A table to keep current sits between two markers naming what it shows::

    <!-- table kind=protocols dirs=results/paper,results/paper-code reg=eps1e-04 -->
    | ... the table, replaced on every fill ... |
    <!-- /table -->

``kind`` is one of :data:`KINDS` (the report's tables, :mod:`curvinf.study.report`),
``dirs`` the result directories it reads (relative to ``root``; several only for
``protocols``, whose columns are the directories' presets), ``reg`` the rule's label;
optionally ``skip=at-chance`` leaves out the configurations whose base model is at
chance (:func:`~curvinf.study.report.models_at_chance`). Everything else in the document
is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from curvinf.storage import atomic_write
from curvinf.study.report import (
    adjacent_table,
    comparison_table,
    eigenvalue_share_table,
    error_table,
    lds_table,
    models_at_chance,
    preset_name,
    protocol_table,
    shares_table,
    stored_results,
    tally_table,
    trend_table,
)

Results = tuple[list[dict], list[dict]]
KINDS: dict[str, Callable[[Results, str], str]] = {
    "lds": lambda res, reg: lds_table(res[0], reg),
    "paired": lambda res, reg: comparison_table(res[1], reg),
    "tally": lambda res, reg: tally_table(res[1], reg),
    "errors": lambda res, reg: error_table(res[0], reg),
    "shares": lambda res, reg: shares_table(res[0], reg),
    "adjacent": lambda res, reg: adjacent_table(res[0], reg),
    "eigenvalue-shares": lambda res, reg: eigenvalue_share_table(res[0], reg),
    "trends": lambda res, reg: trend_table(res[0], res[1], reg),
}
"""Table kinds reading one result directory: (rows, comparisons), rule label -> markdown."""

MARKER = re.compile(r"<!-- table (?P<args>[^>]*?) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def _arguments(text: str) -> dict[str, str]:
    args = dict(part.partition("=")[::2] for part in text.split())
    missing = {"kind", "dirs", "reg"} - set(args)
    if missing or not all(args.values()):
        raise ValueError(
            f"table marker '<!-- table {text} -->' needs kind=, dirs= and reg= (missing "
            f"{', '.join(sorted(missing)) or 'a value'})."
        )
    if args.get("skip", "at-chance") != "at-chance":
        raise ValueError(
            f"table marker '<!-- table {text} -->': skip={args['skip']!r} is not known; the "
            "one choice is skip=at-chance."
        )
    if args["kind"] not in (*KINDS, "protocols"):
        raise ValueError(
            f"table marker '<!-- table {text} -->': unknown kind {args['kind']!r}; use one of "
            f"{', '.join(sorted((*KINDS, 'protocols')))}."
        )
    return args


def table_for(args: dict[str, str], root: Path) -> str:
    """The markdown table a marker's arguments name (module doc), from the stored results."""
    dirs = [root / d for d in args["dirs"].split(",")]
    for d in dirs:
        if not (d / "results.jsonl").is_file():
            raise ValueError(f"{d} holds no results.jsonl; run `curvinf reproduce --out {d}`.")
    named = {preset_name(d): d for d in dirs}
    if len(named) != len(dirs):
        raise ValueError(f"{args['dirs']!r} holds one preset twice; name each once.")
    results = {name: stored_results(d) for name, d in named.items()}
    if not any(r["reg"] == args["reg"] for rows, _ in results.values() for r in rows):
        raise ValueError(f"no row of {args['dirs']} has the rule {args['reg']!r}.")
    if args.get("skip") == "at-chance":
        for name, (rows, comps) in results.items():
            chance = models_at_chance(named[name], rows)
            results[name] = (
                [r for r in rows if r["config"] not in chance],
                [c for c in comps if c["config"] not in chance],
            )
    if args["kind"] == "protocols":
        return protocol_table(results, args["reg"])
    if len(dirs) != 1:
        raise ValueError(f"a {args['kind']!r} table reads one directory, got {args['dirs']!r}.")
    return KINDS[args["kind"]](next(iter(results.values())), args["reg"])


def fill_tables(doc: str | Path, root: str | Path = ".") -> int:
    """Redraw every marked table of ``doc`` (module doc) from the results under ``root``;
    write the document atomically and return how many tables it has. Every marker is
    checked before the document is touched (``ValueError`` naming the bad one)."""
    doc, root = Path(doc), Path(root)
    text = doc.read_text()
    tables = [table_for(_arguments(m["args"]), root) for m in MARKER.finditer(text)]
    if not tables:
        raise ValueError(f"{doc} has no '<!-- table kind=... dirs=... reg=... -->' marker.")
    filled = iter(tables)
    new = MARKER.sub(lambda m: f"<!-- table {m['args']} -->\n{next(filled)}\n<!-- /table -->", text)
    if new != text:
        atomic_write(doc, new.encode())
    return len(tables)


__all__ = ["KINDS", "fill_tables", "table_for"]
