"""Strict FASTA reading: every problem is a one-line DataError naming the file, the line and the fix."""

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError
from .tokenizer import RESIDUES

_VALID = (RESIDUES + RESIDUES.lower()).encode()


def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _check_text(path: Path, line_no: int, line: bytes) -> None:
    if b"\x00" in line:
        raise DataError(f"{path} is a binary file, not FASTA text (NUL byte on line {line_no}); pass a FASTA file")
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{path} is not FASTA text (binary or non-UTF-8 bytes on line {line_no}); "
            "pass a plain or gzipped FASTA file"
        ) from None


def read_fasta(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """Yield (record id, upper-case residues) for every record; reject anything that is not clean FASTA."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path (data.train_path / data.val_path)")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty; pass a FASTA file with '>' records")
    name, chunks, seen_record = None, [], False
    try:
        with _open(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                _check_text(path, line_no, raw)
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(b">"):
                    if name is not None:
                        yield name, b"".join(chunks).upper()
                    name, chunks, seen_record = line[1:].decode().split(" ")[0] or f"record@{line_no}", [], True
                    continue
                if name is None:
                    raise DataError(
                        f"{path}:{line_no}: sequence text before the first '>' header; "
                        "is this a FASTA file? each record must start with a '>name' line"
                    )
                bad = line.translate(None, _VALID)
                if bad:
                    column = next(i for i, c in enumerate(line, 1) if c not in _VALID)
                    raise DataError(
                        f"{path}:{line_no}:{column}: invalid residue character {chr(bad[0])!r}; "
                        f"sequences may only hold the letters {RESIDUES} (remove or replace it, e.g. by X)"
                    )
                chunks.append(line)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e}); pass an intact plain or gzipped FASTA file") from None
    if not seen_record:
        raise DataError(f"{path} holds no FASTA records (no line starts with '>'); pass a FASTA file")
    yield name, b"".join(chunks).upper()
