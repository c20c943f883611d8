"""Embeddings of a FASTA with fair-esm extract.py's arguments: `python embed.py MODEL FASTA OUTPUT_DIR --include mean`."""

from protein_mlm.cli import embed_main

if __name__ == "__main__":
    embed_main()
