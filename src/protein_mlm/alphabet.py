"""The ESM alphabet (33 tokens, the same ids as ESM-2's vocab), shipped with the package."""

from importlib import resources

import numpy as np
from transformers import EsmTokenizer

VOCAB_FILE = resources.files("protein_mlm") / "assets" / "vocab.txt"
VOCAB = VOCAB_FILE.read_text().split()

CLS_ID, PAD_ID, EOS_ID, UNK_ID = (VOCAB.index(t) for t in ("<cls>", "<pad>", "<eos>", "<unk>"))
MASK_ID = VOCAB.index("<mask>")
IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch's cross-entropy default)

# Residue letters a FASTA sequence may hold: the 20 standard amino acids plus the ambiguity and rare codes
# in the ESM alphabet (X B U Z O). Gap characters ('.', '-') are alignment artefacts, not residues.
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
RESIDUES = STANDARD_AMINO_ACIDS + "XBUZO"
STANDARD_AMINO_ACID_IDS = np.array([VOCAB.index(a) for a in STANDARD_AMINO_ACIDS], dtype=np.int64)

# Byte -> token id lookup, so tokenizing is one vectorised indexing op instead of a Python loop per residue.
_LOOKUP = np.full(256, 255, dtype=np.uint8)
for _letter in RESIDUES:
    _LOOKUP[ord(_letter)] = VOCAB.index(_letter)
    _LOOKUP[ord(_letter.lower())] = VOCAB.index(_letter)


def load_tokenizer() -> EsmTokenizer:
    """The Hugging Face tokenizer for the shipped alphabet (no download)."""
    return EsmTokenizer(vocab_file=str(VOCAB_FILE))


def encode_residues(sequence: bytes) -> np.ndarray:
    """Token ids (uint8) of a validated residue string, without <cls>/<eos>."""
    return _LOOKUP[np.frombuffer(sequence, dtype=np.uint8)]
