"""``srdistill data``: the catalogue of standard SR datasets (``list``) and their download (``get``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from srdistill.cli.common import _aliases, _fail, _stage_line


data_app = typer.Typer(no_args_is_help=True, help="Standard SR datasets: list the catalogue, download sets.")


@data_app.command("list")
def data_list() -> None:
    """The catalogue: images, size, licence, checksum status, where each set is present.

    Presence is looked up as eval does: $SRDISTILL_DATA, then the cache, then the vendored data/.
    Sources of the URLs and checksums: docs/DATASETS.md."""
    from srdistill import datasets

    header = ["name", "images", "size", "licence", "checksum", "present"]
    rows = [[r["name"], "?" if r["images"] is None else f"{r['images']:,}", r["size"], r["licence"],
             r["checksum"], str(r["present"]) if r["present"] else "-"] for r in datasets.catalog_rows()]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    typer.echo(f"\nsrdistill data get NAME... [--out DIR] (default DIR: {datasets.cache_root() / 'datasets'}); "
               "checksum 'unconfirmed': get records the sha256 it computed")  # fmt: skip


@data_app.command("get", cls=_aliases({"--dest": "--out"}))
def data_get(
    names: list[str] = typer.Argument(..., help="catalogue names (see `srdistill data list`)"),
    dest: Optional[Path] = typer.Option(None, "--out", help="data root to lay out OUT/NAME/HR/*.png in "
                                        "(default: <cache>/datasets, which eval searches)"),  # fmt: skip
    keep_archives: bool = typer.Option(False, "--keep-archives", help="keep the archives in <cache>/downloads"),
) -> None:
    """Download, verify and lay out sets as OUT/NAME/HR/*.png.

    An interrupted download resumes from its .part file; a set already present is left alone;
    a set whose checksum is unconfirmed gets a warning and its computed sha256 recorded."""
    from srdistill import datasets

    try:
        datasets.get_many(names, dest, keep_archives=keep_archives, log=_stage_line)
    except (datasets.DatasetError, OSError) as exc:  # requests' errors are OSErrors
        _fail(str(exc))
    if dest is not None and dest.expanduser().resolve() not in {r.resolve() for r in datasets.data_roots()}:
        typer.echo(f"note: {dest} is not searched by default; export SRDISTILL_DATA={dest} for eval to find it")
