"""Zero-shot variant-effect scores with fair-esm predict.py's arguments: `python score.py --model-location MODEL ...`."""

from protein_mlm.cli import score_main

if __name__ == "__main__":
    score_main()
