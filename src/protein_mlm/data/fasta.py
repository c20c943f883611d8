"""Strict FASTA reading: every problem is a one-line DataError naming the file, the line and the fix."""

import gzip
import hashlib
import multiprocessing
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from protein_mlm.alphabet import RESIDUES
from protein_mlm.errors import DataError

_VALID = (RESIDUES + RESIDUES.lower()).encode()
BLOCK_BYTES = 16 << 20  # text read and parsed at a time (a record longer than this makes its block longer)
PARALLEL_MIN_BYTES = 64 << 20  # smaller files are parsed in this process: starting workers would cost more


def open_maybe_gzipped(path: Path, text: bool = False):
    """Open a plain or gzip-compressed file (told apart by its magic bytes, not its name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    return opener(path, "rt", encoding="utf-8") if text else opener(path, "rb")


def sequence_digest(data: bytes) -> bytes:
    """The 16-byte identity of a sequence (residue letters or token ids) for deduplication and leak checks.

    The only definition: the split, the streaming exclusion and the cluster rows must agree byte for byte.
    """
    return hashlib.blake2b(data, digest_size=16).digest()


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


def check_residues(residues: bytes, where: str) -> None:
    """Reject residue text outside the alphabet (alignment gaps get their own hint); `where` locates it."""
    bad = residues.translate(None, _VALID)
    if bad and bad.strip(b"-.") == b"":
        raise DataError(
            f"{where}: alignment gap characters ('-' or '.'); pass unaligned sequences "
            "(strip the gaps, e.g. with `seqkit seq -g`)"
        )
    if bad:
        column = next(i for i, c in enumerate(residues, 1) if c not in _VALID)
        raise DataError(
            f"{where}:{column}: invalid residue character {chr(bad[0])!r}; "
            f"sequences may only hold the letters {RESIDUES} (remove or replace it, e.g. by X)"
        )


def has_residue_line(path: str | Path) -> bool:
    """False only for a non-empty FASTA whose every line is a header or blank (records with no residues).

    Reads up to the first residue line, so a real file costs a line or two; any other problem is left to the
    strict reader, which names the line.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        return True
    try:
        with open_maybe_gzipped(path) as handle:
            return any(line.strip() and not line.lstrip().startswith(b">") for line in handle)
    except (OSError, EOFError, zlib.error):
        return True


def read_fasta(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """Yield (record id, upper-case residues) for every record; reject anything that is not clean FASTA."""
    for record_id, _, residues in read_fasta_records(path):
        yield record_id, residues


def read_fasta_records(path: str | Path, workers: int = 1) -> Iterator[tuple[str, str, bytes]]:
    """Yield (record id, whole header line without '>', upper-case residues) for every record, as read_fasta.

    With `workers` > 1 and a file of PARALLEL_MIN_BYTES or more, blocks of whole records are parsed in that many
    processes; the records, their order and every error message are the same as with one.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a FASTA file (a directory of them needs data.streaming=true)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path (data.train_path / data.val_path)")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty; pass a FASTA file with '>' records")
    seen_record = False
    try:
        with open_maybe_gzipped(path) as handle:
            parallel = workers > 1 and path.stat().st_size >= PARALLEL_MIN_BYTES
            blocks = _record_blocks(handle)
            parsed = _parse_in_processes(path, blocks, workers) if parallel else (_parse(path, *b) for b in blocks)
            for records in parsed:
                seen_record = seen_record or bool(records)
                yield from records
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e}); pass an intact plain or gzipped FASTA file") from None
    if not seen_record:
        raise DataError(f"{path} holds no FASTA records (no line starts with '>'); pass a FASTA file")


def _record_blocks(handle) -> Iterator[tuple[bytes, int]]:
    """(text, number of its first line): the file cut into blocks of whole records, at lines that start with '>'."""
    carry, line_no = b"", 1
    while chunk := handle.read(BLOCK_BYTES):
        carry += chunk
        cut = carry.rfind(b"\n>") + 1  # 0 when no record starts in this chunk: read on
        if cut:
            yield carry[:cut], line_no
            line_no += carry.count(b"\n", 0, cut)
            carry = carry[cut:]
    if carry:
        yield carry, line_no


def _parse_in_processes(path: Path, blocks: Iterator[tuple[bytes, int]], workers: int) -> Iterator[list]:
    """_parse over `blocks` in `workers` processes, results in block order; at most 2 x workers blocks in flight."""
    # fork: the children need no re-import of the main module (spawn would, and a Hydra or stdin main breaks it);
    # they only parse bytes, touching no lock another thread of the parent may hold.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    pending: deque = deque()
    try:
        for block in blocks:
            pending.append(pool.submit(_parse, path, *block))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _parse(path: Path, text: bytes, first_line: int) -> list[tuple[str, str, bytes]]:
    """The records of a block of whole records starting at line `first_line` of `path` (strict, as read_fasta)."""
    records, name, header, chunks = [], None, "", []
    for line_no, raw in enumerate(text.split(b"\n"), start=first_line):
        if line_no == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
        line = raw.strip()
        if line.startswith(b">"):  # the id is the header's first word; the rest is kept as the label
            if name is not None:
                records.append((name, header, b"".join(chunks).upper()))
            record_id = line[1:].split(maxsplit=1)[0] if line[1:].strip() else b""
            name = record_id.decode("utf-8", errors="replace") or f"record@{line_no}"
            header = line[1:].strip().decode("utf-8", errors="replace")
            chunks = []
            continue
        _check_text(path, line_no, raw)
        if not line:
            continue
        if name is None:
            raise DataError(
                f"{path}:{line_no}: sequence text before the first '>' header; "
                "is this a FASTA file? each record must start with a '>name' line"
            )
        check_residues(line, f"{path}:{line_no}")
        chunks.append(line)
    if name is not None:
        records.append((name, header, b"".join(chunks).upper()))
    return records
