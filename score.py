"""Zero-shot variant-effect scores as fair-esm predict.py: `python score.py --model-location MODEL --sequence ...`."""

from protein_mlm.inference.commands import score_main

if __name__ == "__main__":
    score_main()
