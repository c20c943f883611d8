"""Console entry points of the inference tools (argparse, not Hydra): user errors as the training CLI reports them."""

import logging

from protein_mlm.errors import STORAGE_ERRORS, UserError, fail


def argparse_main(create_parser, run_tool) -> None:
    """Run an argparse tool (embed, score): a user error is one line and exit 2, without a traceback."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    hf_logging.disable_progress_bar()  # its per-load "Loading weights" bar says nothing a user needs
    args = create_parser().parse_args()
    try:
        run_tool(args)
    except UserError as e:
        fail(str(e))
    except OSError as e:  # a full or read-only disk: the storage's failure, not the program's
        if e.errno not in STORAGE_ERRORS:
            raise
        fail(f"cannot write {e.filename or 'a file'} ({e.strerror}); free space or choose another output path")


def embed_main() -> None:
    """Entry point of `python embed.py` and the `protein-mlm-embed` console script."""
    from protein_mlm.inference.embed import create_parser, run

    argparse_main(create_parser, run)


def score_main() -> None:
    """Entry point of `python score.py` and the `protein-mlm-score` console script."""
    from protein_mlm.inference.proteingym import run
    from protein_mlm.inference.score import create_parser

    argparse_main(create_parser, run)
