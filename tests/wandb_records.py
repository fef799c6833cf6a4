"""Read the records of an offline W&B run's .wandb file (a LevelDB-style log of protobuf Records): 0.31 has no
public reader, and the public API refuses without a key."""
from __future__ import annotations

import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7  # log blocks; each record chunk: crc32 (4), length (2), type (1); FULL=1, LAST=4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = Path(path).read_bytes(), HEADER, b"", []  # the file opens with a 7-byte ":W&B" header
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if left < HEADER or (length == 0 and kind == 0):
            pos += left  # block padding
            continue
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def artifacts(run_dir: Path) -> list:
    """Every artifact record of the one offline W&B run under run_dir (inputs carry use_after_commit)."""
    [path] = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    return [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
