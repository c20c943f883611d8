"""Export a training checkpoint as a Hugging Face model directory (model + tokenizer), loadable offline.

Usage: python scripts/export_hf.py <checkpoint.ckpt or run dir> <out_dir>
Then:  EsmForMaskedLM.from_pretrained(out_dir); AutoTokenizer.from_pretrained(out_dir)
"""

import sys

from protein_mlm.errors import UserError
from protein_mlm.model.checkpoints import export_hf


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/export_hf.py <checkpoint.ckpt or run dir> <out_dir>")
    try:
        out = export_hf(sys.argv[1], sys.argv[2])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote a Hugging Face model directory to {out}")


if __name__ == "__main__":
    main()
