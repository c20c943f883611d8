"""Evaluate a checkpoint on any FASTA: `python eval.py ckpt_path=<ckpt or run dir> data.val_path=<FASTA>`."""

from protein_mlm.cli import eval_main

if __name__ == "__main__":
    eval_main()
