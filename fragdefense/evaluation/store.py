"""A resumable on-disk store of finished cells.

Layout under ``out_dir``::

    eval_config.json                          what defines the results (refused if a rerun differs)
    cells/<cell key>/shard-<r>-of-<w>.json    one finished cell of one shard, written atomically

A run killed at any point and rerun with the same ``out_dir`` reads back every finished cell and computes only the
rest; :meth:`CellStore.merge` joins the shards of a cell into one result (rows sorted by image id).

>>> import tempfile
>>> store = CellStore(tempfile.mkdtemp(), {"seed": 0, "attacks": ["topk"]})
>>> store.has("saliency__topk__8_255")
False
>>> CellStore(store.out_dir, {"seed": 1, "attacks": ["topk"]})
Traceback (most recent call last):
...
ValueError: `out_dir` ... holds a run with a different configuration: seed: 0 -> 1; use a new out_dir, or delete ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fragdefense.evaluation.engine import Cell, CellResult, aggregate_rows
from fragdefense.utils.conventions import Budget
from fragdefense.utils.io import atomic_write_json

__all__ = ["CellStore", "config_differences", "check_writable"]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every differing (flattened) key.

    >>> config_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2})
    ['a.b: 1 -> 2']
    """
    fo, fn = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
    keys = sorted(set(fo) | set(fn))
    return [f"{k}: {fo.get(k, '<absent>')} -> {fn.get(k, '<absent>')}" for k in keys if fo.get(k) != fn.get(k)]


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and prove it writable (a probe file), before any expensive work; the error names it."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"`out_dir`={str(path)!r} is not writable ({e.strerror or e}); choose another out_dir"
        ) from e
    return path


class CellStore:
    """Finished cells of one evaluation run under ``out_dir`` (see the module docstring).

    Args:
        out_dir: the run directory.
        config: what defines the results (model, data, images, grid, protocol, seed; not the device or the number
            of processes). A rerun whose config differs is refused with the differing keys.
        rank, world_size: this process's shard.
    """

    def __init__(self, out_dir: str | os.PathLike, config: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
        self.out_dir = check_writable(out_dir)
        self.rank, self.world_size = int(rank), int(world_size)
        self.config = json.loads(json.dumps(config, default=str))
        cfg_path = self.out_dir / "eval_config.json"
        if cfg_path.is_file():
            old = json.loads(cfg_path.read_text())
            diffs = config_differences(old, self.config)
            if diffs:
                raise ValueError(
                    f"`out_dir` {str(self.out_dir)!r} holds a run with a different configuration: "
                    + "; ".join(diffs[:12])
                    + ("; ..." if len(diffs) > 12 else "")
                    + "; use a new out_dir, or delete it to start over"
                )
        elif self.rank == 0:
            atomic_write_json(cfg_path, self.config)

    def _path(self, key: str, rank: int | None = None) -> Path:
        r = self.rank if rank is None else rank
        return self.out_dir / "cells" / key / f"shard-{r}-of-{self.world_size}.json"

    def has(self, key: str) -> bool:
        """Whether this shard of the cell is finished."""
        return self._path(key).is_file()

    def finished_keys(self) -> list[str]:
        """Cells whose every shard is finished."""
        root = self.out_dir / "cells"
        if not root.is_dir():
            return []
        return sorted(
            d.name for d in root.iterdir() if all(self._path(d.name, r).is_file() for r in range(self.world_size))
        )

    def write(self, res: CellResult) -> Path:
        """Write this shard of a finished cell atomically."""
        payload = {
            "cell": {
                "explainer": res.cell.explainer,
                "attack": res.cell.attack,
                "eps": str(res.cell.eps),
                "kind": res.cell.kind,
            },
            "rank": self.rank,
            "world_size": self.world_size,
            "rows": res.rows,
            "aggregate": res.aggregate,
            "seconds": res.seconds,
            "warnings": res.warnings,
        }
        return atomic_write_json(self._path(res.cell.key), payload)

    def read(self, cell: Cell, rank: int | None = None) -> CellResult:
        """This shard's finished cell, read back (``resumed=True``, no figure examples)."""
        d = json.loads(self._path(cell.key, rank).read_text())
        return CellResult(
            cell, d["rows"], d["aggregate"], None, True, float(d.get("seconds", 0.0)), d.get("warnings", [])
        )

    def merge(self, cell: Cell) -> CellResult:
        """All shards of a finished cell joined: rows sorted by image id, aggregate over all of them."""
        parts = [self.read(cell, r) for r in range(self.world_size)]
        rows = sorted((row for p in parts for row in p.rows), key=lambda r: r["image"])
        skipped = sum(int(p.aggregate.get("n_skipped", 0)) for p in parts)
        notes: list[str] = []
        for p in parts:
            notes += [w for w in p.warnings if w not in notes]
        if cell.kind == "robust":
            from fragdefense.evaluation.quality import robust_aggregate

            agg = {**parts[0].aggregate, **robust_aggregate(rows)}
        else:
            agg = aggregate_rows(rows, skipped)
            if cell.kind == "quality":  # every score keeps its key (None where no image was scored)
                agg = {**{k: None for k in parts[0].aggregate}, **agg}
        return CellResult(cell, rows, agg, None, True, max(p.seconds for p in parts), notes)


def parse_cell(d: dict[str, Any]) -> Cell:
    """A :class:`Cell` from its stored form."""
    return Cell(d["explainer"], d["attack"], Budget(d["eps"]), d.get("kind", "attack"))
