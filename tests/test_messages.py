"""Messages that must name the real problem: odd but valid FASTA is read, near-misses get the precise fix."""

import pytest

from protein_mlm.data.fasta import read_fasta
from protein_mlm.data.preprocess import build_splits
from protein_mlm.errors import ConfigError, DataError
from protein_mlm.preflight import check_config
from tests.conftest import compose_config


def test_a_byte_order_mark_and_non_utf8_header_bytes_are_read(tmp_path):
    path = tmp_path / "odd.fasta"
    path.write_bytes(b"\xef\xbb\xbf>sp|P1|X desc \xff\xfe\nMKV\n>P2\nAAA\n")  # only the id of a header is used
    assert list(read_fasta(path)) == [("sp|P1|X", b"MKV"), ("P2", b"AAA")]


def test_alignment_gaps_are_named_as_such(tmp_path):
    path = tmp_path / "aligned.fasta"
    path.write_bytes(b">a\nMK--V\n")
    with pytest.raises(DataError, match="alignment gap characters .* pass unaligned sequences"):
        list(read_fasta(path))


def test_a_directory_is_named_as_a_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory; pass a FASTA file"):
        list(read_fasta(tmp_path))


def test_a_headers_only_file_is_named_itself(tmp_path):
    headers, good = tmp_path / "headers.fasta", tmp_path / "good.fasta"
    headers.write_bytes(b">a\n>b\n")
    good.write_bytes(b">a\nMKTAYIAKQR\n>b\nMSIIGATRLQ\n")
    with pytest.raises(DataError, match=f"{headers} holds no sequence"):
        build_splits(headers, None, 0.1)
    with pytest.raises(DataError, match=f"{headers} holds no sequence"):  # the validation file, not the training one
        build_splits(good, headers, 0.1)


def test_same_file_for_training_and_validation(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_bytes(b">a\nMKV\n")
    cfg = compose_config("trainer=cpu", f"data.train_path={path}", f"data.val_path={path}")
    with pytest.raises(ConfigError, match="data.train_path and data.val_path are the same file"):
        check_config(cfg)


@pytest.mark.parametrize(
    ("override", "arguments"),
    [
        ("data.batch_size=0", {"batch_size": 0}),
        ("data.max_length=2", {"max_length": 2, "max_tokens": None}),
        ("data.max_tokens=100", {"max_length": 1024, "max_tokens": 100}),
        ("data.val_fraction=0", {"val_fraction": 0.0}),
    ],
)
def test_a_data_rule_reads_the_same_from_preflight_and_the_datamodule(override, arguments):
    """One definition (data/options.py): a config and a DataModule built directly break it with one message."""
    from protein_mlm.data.datamodule import ProteinDataModule

    with pytest.raises(ConfigError) as checked:
        check_config(compose_config("trainer=cpu", override))
    with pytest.raises(ConfigError) as direct:
        ProteinDataModule(**arguments)
    assert str(direct.value) == str(checked.value)
