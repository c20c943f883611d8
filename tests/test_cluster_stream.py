"""The streamed (out-of-core) first read of a cluster map writes the same cache, byte for byte, as the in-memory one."""

import gzip
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protein_mlm.data import cluster_join
from protein_mlm.data.clusters import build_cluster_cache, match_records, open_cluster_cache
from protein_mlm.errors import DataError


def in_memory_arrays(cluster_map: Path, records: pa.Table, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the in-memory first read this module had before it was streamed (one join, one sort)."""
    joined, names, _ = match_records(cluster_map, records)
    rank = np.empty(len(names), dtype=np.int64)
    rank[pc.sort_indices(names).to_numpy()] = np.arange(len(names))
    pairs = np.sort(rank[joined["cluster"].to_numpy()] * rows + joined["row"].to_numpy())
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])]
    named, members = np.divmod(pairs, rows)
    starts = np.concatenate([[True], named[1:] != named[:-1]])
    clustered = np.zeros(rows, dtype=bool)
    clustered[members] = True
    singletons = np.flatnonzero(~clustered)
    sizes = np.concatenate([np.diff(np.flatnonzero(np.append(starts, True))), np.ones(len(singletons), np.int64)])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return offsets, np.concatenate([members, singletons]).astype(np.int64)


@st.composite
def maps(draw):
    """(map lines, (id, row) records, rows): clusters of one and many, members missing from the records, records
    in no cluster, duplicated sequences (two ids, one row), names sharing prefixes, lines in any order."""
    name = st.text("AB_0123456789", min_size=1, max_size=12)
    cluster_names = draw(st.lists(name, min_size=1, max_size=12, unique=True))
    member_ids = draw(st.lists(name.map(lambda s: "U" + s), min_size=1, max_size=40, unique=True))
    cluster_of = {m: draw(st.sampled_from(cluster_names)) for m in member_ids}
    extra = draw(st.lists(name.map(lambda s: "X" + s), max_size=8, unique=True))  # records no line names
    in_fasta = [m for m in member_ids if draw(st.booleans()) or m == member_ids[0]] + extra
    rows = draw(st.integers(1, len(in_fasta)))
    row_of = {i: draw(st.integers(0, rows - 1)) for i in in_fasta}  # a row is one or more records (duplicates)
    for row in set(range(rows)) - set(row_of.values()):  # every row stands for some record
        row_of[f"Y{row}"] = row
    lines = [f"{cluster_of[m]}\t{m}\n" for m in member_ids]
    lines += [f"{cluster_of[m]}\t{m}\n" for m in draw(st.lists(st.sampled_from(member_ids), max_size=5))]  # repeats
    lines = draw(st.permutations(lines))
    return lines, row_of, rows


def records_in_chunks(row_of: dict[str, int], chunk: int) -> list[pa.Table]:
    ids = list(row_of)
    return [
        pa.table({"id": pa.array(ids[i : i + chunk], pa.string()), "row": [row_of[x] for x in ids[i : i + chunk]]})
        for i in range(0, len(ids), chunk)
    ]


def check_same_cache(tmp: Path, lines, row_of, rows, gz: bool = False):
    path = tmp / ("map.tsv.gz" if gz else "map.tsv")
    text = "".join(lines).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    cache = tmp / "cache" / "map.clusters"
    build_cluster_cache(path, records_in_chunks(row_of, chunk=3), rows, "records", cache)
    offsets, members = in_memory_arrays(path, pa.table({"id": list(row_of), "row": list(row_of.values())}), rows)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "members.npy", members)
    for name in ("offsets.npy", "members.npy"):
        assert (cache / name).read_bytes() == (tmp / name).read_bytes(), name
    assert [p.name for p in cache.iterdir()] and not list(cache.glob("spill-*"))  # the spill is gone
    assert open_cluster_cache(cache, rows) is not None


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of a few lines: a map of tens of lines spills into many member buckets and cluster ranges."""
    monkeypatch.setattr(cluster_join, "BUCKET_LINES", 3)
    monkeypatch.setattr(cluster_join, "SAMPLE_EVERY", 1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=maps())
def test_streamed_first_read_equals_the_in_memory_one(tmp_path_factory, small_buckets, data):
    check_same_cache(tmp_path_factory.mktemp("map"), *data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=maps(), gz=st.booleans(), bucket_lines=st.sampled_from([1, 2, 5, 1000]))
def test_streamed_first_read_equals_the_in_memory_one_many(tmp_path_factory, monkeypatch, data, gz, bucket_lines):
    monkeypatch.setattr(cluster_join, "BUCKET_LINES", bucket_lines)
    check_same_cache(tmp_path_factory.mktemp("map"), *data, gz=gz)


def test_a_member_in_two_clusters_names_its_first_line_across_buckets(tmp_path, small_buckets):
    path = tmp_path / "m.tsv"
    lines = [f"C{i % 5}\tM{i}\n" for i in range(40)] + ["C9\tM7\n", "C8\tM3\n"]
    path.write_text("".join(lines))
    records = [pa.table({"id": [f"M{i}" for i in range(40)], "row": list(range(40))})]
    with pytest.raises(DataError, match=r"m.tsv:41: member M7 is in cluster C9 here and in C2 on line 8"):
        build_cluster_cache(path, records, 40, "records", tmp_path / "c")
    assert not list(tmp_path.glob(".c-*"))  # nothing half-built left beside the cache


def test_dropped_clusters_are_counted_across_ranges(tmp_path, small_buckets, caplog):
    path = tmp_path / "m.tsv"
    path.write_text("".join(f"C{i:02d}\tM{i}\n" for i in range(30)))
    records = [pa.table({"id": [f"M{i}" for i in range(0, 30, 3)], "row": list(range(10))})]
    with caplog.at_level(logging.INFO, logger="protein_mlm.data.clusters"):
        build_cluster_cache(path, records, 10, "records", tmp_path / "c")
    assert "dropped 20 of the 30 clusters" in caplog.text and "10 clusters (10 from" in caplog.text


def test_hash_buckets_do_not_depend_on_the_table_a_string_comes_from():
    ids = ["", "a", "UniRef90_A0A024R1R8", "x" * 40, "tr|A0A024R1R8|A0A024R1R8_HUMAN", "é"]
    alone = [int(cluster_join.hash_bucket(pa.chunked_array([[i]]), 97)[0]) for i in ids]
    together = cluster_join.hash_bucket(pa.chunked_array([ids[:2], ["pad", *ids[2:]]]).slice(0), 97).tolist()
    assert together[:2] + together[3:] == alone
    spread = np.bincount(cluster_join.hash_bucket(pa.chunked_array([[f"UniRef90_P{i}" for i in range(20000)]]), 10))
    assert spread.min() > 1500  # about 2000 each
