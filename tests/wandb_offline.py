"""Read back an offline W&B run (``<out_dir>/wandb/offline-run-*/run-<id>.wandb``) for tests, without a server and
without mocking W&B.

The installed wandb (0.31) writes its runs from its Go service (``wandb-core``) and no longer ships a Python reader
of the ``.wandb`` transaction log (the old ``wandb.sdk.internal.datastore.DataStore`` is gone), so this module
decodes the file itself. Its format: a 7-byte file header (``b":W&B"``, magic ``0xBEE1``, version 0), then the
LevelDB log format in 32 KiB blocks: each chunk has a 7-byte header (CRC-32 seeded with the chunk type, length,
type FULL / FIRST / MIDDLE / LAST), a record may span blocks, and a block tail shorter than a header is zero
padding. Every record is a serialised ``wandb.proto.wandb_internal_pb2.Record``.

API::

    run = read_offline_run(out_dir)          # the newest offline run under out_dir/wandb (or a run dir / .wandb);
                                             # waits (<= 30 s) for its exit record: W&B writes the file async
    run["history"]    # list of dicts, one per logged step: logged key -> value (JSON-decoded; a wandb.Image /
                      # wandb.Table appears as a dict with "_type": "image-file" / "table-file", "path", ...;
                      # a logged dict stays a dict); W&B adds "_step", "_runtime", "_timestamp"
    run["summary"]    # dict key -> last value (JSON-decoded)
    run["config"]     # dict key -> value (the run config, JSON-decoded; W&B's own "_wandb" entry removed)
    run["artifacts"]  # list of dicts: name, type, digest, files (list of manifest paths); every logged
                      # wandb.Table also adds one of type "run_table"
    run["run"]        # dict: id, project, job_type, tags, group, name (from the run record)
    run["exit_code"]  # int (0: finished, 1: the command raised), or None when the run did not finish
    run["dir"]        # the run directory (pathlib.Path): logged media are in run["dir"] / "files" / <entry "path">
    history_keys(run) # the union of the keys of every history step (W&B's "_step", "_runtime", ... included)
    load_table(run, entry)  # a "table-file" history entry -> {"columns": [...], "data": [[...], ...]}

``iter_records(path)`` yields the raw ``Record`` protos of one ``.wandb`` file for anything else.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_offline_run", "iter_records", "find_run_file", "history_keys", "load_table"]

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) & 0xFFFFFFFF for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


def find_run_file(path: str | os.PathLike) -> Path:
    """The ``.wandb`` file of ``path``: a ``.wandb`` file itself, a run directory (``offline-run-*``) or a directory
    holding ``wandb/offline-run-*`` or ``offline-run-*`` (the newest run by name, i.e. by start time)."""
    p = Path(path)
    if p.is_file():
        return p
    files = sorted(p.glob("run-*.wandb"))
    if not files:
        runs = sorted(p.glob("wandb/offline-run-*")) or sorted(p.glob("offline-run-*"))
        files = sorted(runs[-1].glob("run-*.wandb")) if runs else []
    if not files:
        raise FileNotFoundError(f"no offline W&B run (wandb/offline-run-*/run-*.wandb) under {p}")
    return files[-1]


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"not a W&B transaction log (header {ident!r}, magic {magic:#x}, version {version})")
    pos = _FILE_HEADER.size
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # zero padding at a block's end
            pos += left
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            return  # a truncated tail (the run is still being written)
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated, unwritten space
            return
        payload = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        if len(payload) < length:
            return
        if kind not in _TYPE_CRC or zlib.crc32(payload, _TYPE_CRC[kind]) & 0xFFFFFFFF != crc:
            raise ValueError(f"corrupt W&B transaction log at byte {pos} (chunk type {kind})")
        yield kind, payload
        pos += _CHUNK_HEADER.size + length


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file (or of :func:`find_run_file`'s choice)."""
    from wandb.proto import wandb_internal_pb2

    data = find_run_file(path).read_bytes()
    buf: bytes | None = None
    for kind, payload in _chunks(data):
        if kind == _FULL:
            buf, whole = None, payload
        elif kind == _FIRST:
            buf = payload
            continue
        elif buf is None:
            raise ValueError("corrupt W&B transaction log: a MIDDLE/LAST chunk without a FIRST one")
        elif kind == _MIDDLE:
            buf += payload
            continue
        else:
            buf, whole = None, buf + payload
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(whole)
        yield rec


def _value(item: Any) -> Any:
    try:
        return json.loads(item.value_json)
    except ValueError:
        return item.value_json


def _put(d: dict[str, Any], item: Any) -> None:
    """Store an item at its key path: W&B splits logged media (and logged dicts) into one item per field, e.g.
    ``("figures/x", "_type")``; they are put back together as ``d["figures/x"] = {"_type": ..., ...}``."""
    path = list(item.nested_key) or [item.key]
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = _value(item)


def _drop(d: dict[str, Any], item: Any) -> None:
    path = list(item.nested_key) or [item.key]
    for k in path[:-1]:
        d = d.get(k, {})
    d.pop(path[-1], None)


def read_offline_run(path: str | os.PathLike, wait: float = 30.0) -> dict[str, Any]:
    """Everything an offline run logged, as plain Python (see the module docstring for the keys).

    ``run.finish()`` can return before W&B's service has written the run's records to the file (seen with wandb
    0.31: a header-only file right after ``finish``), so this waits up to ``wait`` seconds for the run's final
    ``exit`` record; a run that never finished is returned as far as it was written, with ``exit_code`` ``None``.

    Args:
        path: a command's ``out_dir`` (its newest ``wandb/offline-run-*`` is read), a run directory or a ``.wandb``
            file.
        wait: seconds to wait for the ``exit`` record (0: read the file as it is now).
    """
    file = find_run_file(path)
    deadline = time.monotonic() + wait
    while True:
        try:
            out = _parse(file)
        except ValueError:  # a chunk being written
            if time.monotonic() >= deadline:
                raise
            out = None
        if out is not None and (out["exit_code"] is not None or time.monotonic() >= deadline):
            return out
        time.sleep(0.1)


def _parse(file: Path) -> dict[str, Any]:
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    artifacts: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    exit_code = None
    for rec in iter_records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for i in rec.history.item:
                _put(row, i)
            history.append(row)
        elif kind == "summary":
            for i in rec.summary.update:
                _put(summary, i)
            for i in rec.summary.remove:
                _drop(summary, i)
        elif kind == "config":
            for i in rec.config.update:
                _put(config, i)
            for i in rec.config.remove:
                _drop(config, i)
        elif kind == "run":
            r = rec.run
            info = {
                "id": r.run_id,
                "project": r.project,
                "entity": r.entity,
                "job_type": r.job_type,
                "tags": list(r.tags),
                "group": r.run_group,
                "name": r.display_name,
            }
            for i in r.config.update:
                _put(config, i)
        elif kind == "artifact":
            a = rec.artifact
            artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "digest": a.digest,
                    "files": [e.path for e in a.manifest.contents],
                }
            )
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    config.pop("_wandb", None)
    return {
        "history": history,
        "summary": summary,
        "config": config,
        "artifacts": artifacts,
        "run": info,
        "exit_code": exit_code,
        "dir": file.parent,
    }


def history_keys(run: dict[str, Any]) -> set[str]:
    """The union of the keys logged at every history step."""
    return {k for row in run["history"] for k in row}


def load_table(run: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a logged ``wandb.Table`` (``{"columns": [...], "data": [[...], ...]}``) from its history entry
    (``{"_type": "table-file", "path": "media/table/...table.json", ...}``)."""
    if not isinstance(entry, dict) or entry.get("_type") != "table-file":
        raise ValueError(f"not a logged wandb.Table entry: {entry!r}")
    return json.loads((run["dir"] / "files" / entry["path"]).read_text())
