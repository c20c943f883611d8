"""Embeddings as fair-esm extract.py writes them: `python embed.py MODEL FASTA OUTPUT_DIR --include mean per_tok`."""

from protein_mlm.inference.commands import embed_main

if __name__ == "__main__":
    embed_main()
