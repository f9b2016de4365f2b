"""Read a W&B run back from its local transaction log ``run-<id>.wandb`` (offline runs, no server).

The records are W&B's own protobufs (``wandb.proto.wandb_internal_pb2.Record``: run, config, history,
summary, exit, ...). Only their framing is decoded here, because wandb >= 0.2x ships no Python reader
any more (the old ``wandb.sdk.internal.datastore`` moved into the Go ``wandb-core``) and offline runs
write no ``wandb-summary.json``. The framing is the LevelDB log format that datastore documented: a
7-byte header ``":W&B"`` + magic 0xBEE1 + version 0, then 32 KiB blocks of records
``crc32 (uint32 LE, zlib crc of the type byte then the data) | length (uint16 LE) | type (FULL=1,
FIRST=2, MIDDLE=3, LAST=4) | data``; a block tail shorter than a record header is zero padding.

Used by ``organseg sweep`` (a trial's metric is its run summary, as for the W&B server) and the tests.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

from organseg.errors import InputError

BLOCK = 32768
HEADER = struct.Struct("<IHB")  # checksum, length, type
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_CRC = [zlib.crc32(bytes([t])) & 0xFFFFFFFF for t in range(LAST + 1)]


@dataclass
class RunLog:
    """What a run logged: ``config`` (wandb.config, values unwrapped), ``summary`` (the merged summary
    updates: the last value of every key, W&B's sweep metric), ``history`` (one dict per ``log`` call),
    ``exit_code`` (None if the run did not finish)."""

    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def keys(self) -> set[str]:
        """Every key that appears in some history row."""
        return {k for row in self.history for k in row}


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The raw record payloads of a ``.wandb`` file; a torn tail (a run still writing or killed) ends
    the iteration, a bad header or checksum is a one-line InputError (a ValueError) naming the file."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data) != (IDENT, MAGIC, VERSION):
        raise InputError(f"{path}: not a W&B transaction log (bad header)")
    pos, pending = FILE_HEADER.size, b""
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # block trailer padding
            pos += left
            continue
        checksum, length, kind = HEADER.unpack_from(data, pos)
        start, end = pos + HEADER.size, pos + HEADER.size + length
        if kind == 0 and length == 0 and checksum == 0:  # zero-filled (preallocated) rest of a block
            pos += left
            continue
        if end > len(data) or kind > LAST:
            return  # torn write at the end of a live/killed run
        payload = data[start:end]
        if zlib.crc32(payload, _TYPE_CRC[kind]) & 0xFFFFFFFF != checksum:
            raise InputError(f"{path}: corrupt record at byte {pos} (checksum mismatch)")
        pos = end
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        else:
            yield pending + payload
            pending = b""


def iter_records(path: str | Path):
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order."""

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _put(target: dict, item) -> None:
    """Set ``item.key`` (or the nested ``item.nested_key`` path) to its JSON value."""
    value = json.loads(item.value_json) if item.value_json else None
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def _config_items(items, config: dict) -> None:
    for item in items:
        _put(config, item)
    for key, value in list(config.items()):
        # wandb stores config entries as {"value": v, "desc": ...}
        if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
            config[key] = value["value"]


def read_run(path: str | Path) -> RunLog:
    """Config, summary, history and exit code of the run whose transaction log is ``path``."""
    log = RunLog(Path(path))
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            log.run_id = record.run.run_id
            _config_items(record.run.config.update, log.config)
        elif kind == "config":
            _config_items(record.config.update, log.config)
            for item in record.config.remove:
                log.config.pop(item.key, None)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            log.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(log.summary, item)
            for item in record.summary.remove:
                log.summary.pop(item.key, None)
        elif kind == "exit":
            log.exit_code = int(record.exit.exit_code)
    return log


def find_run_file(wandb_dir: str | Path, run_id: str) -> Path | None:
    """The newest ``<wandb_dir>/{offline-,}run-<time>-<run_id>/run-<run_id>.wandb``, or None."""
    found = sorted(Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.parent.name)
    return found[-1] if found else None
