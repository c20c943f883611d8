"""`protein-mlm-embed`: per-token, mean and BOS representations and contacts, with fair-esm extract.py's arguments.

`--format pt` (default) writes extract.py's files: one `<record id>.pt` per record. `--format npy` streams into one
memory-mapped array per kind and layer (see docs/downstream.md), so a million sequences never sit in memory or in
a million files. Both skip, on a rerun, the records already written.
"""

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from protein_mlm.alphabet import CLS_ID, EOS_ID, PAD_ID, encode_residues
from protein_mlm.data.readers import read_records
from protein_mlm.errors import ConfigError, DataError
from protein_mlm.inference.loading import LoadedModel, device_for, load_model
from protein_mlm.inference.progress import progress_bar
from protein_mlm.inference.writers import NpyWriter, PtWriter, Record, check_manifest

log = logging.getLogger(__name__)
KINDS = ("mean", "per_tok", "bos", "contacts")
CHUNK_RECORDS = 20_000  # records read, sorted by length and batched at a time: bounded memory for any FASTA size


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protein-mlm-embed",
        description="Extract per-token representations and model outputs for sequences in a FASTA file "
        "(the arguments and .pt files of fair-esm's scripts/extract.py)",
    )
    parser.add_argument(
        "model_location", help="a run dir, a .ckpt, an HF export, a local HF ESM directory or a fair-esm .pt"
    )
    parser.add_argument("fasta_file", type=Path, help="FASTA file on which to extract representations")
    parser.add_argument("output_dir", type=Path, help="output directory for extracted representations")
    parser.add_argument("--toks_per_batch", type=int, default=4096, help="maximum batch size (padded tokens)")
    parser.add_argument(
        "--repr_layers", type=int, default=[-1], nargs="+", help="layer indices (0 to num_layers; -1 is the last)"
    )
    parser.add_argument("--include", nargs="+", choices=KINDS, required=True, help="which representations to return")
    parser.add_argument("--truncation_seq_length", type=int, default=1022, help="cut longer sequences to this length")
    parser.add_argument("--nogpu", action="store_true", help="do not use a GPU even if available")
    parser.add_argument("--format", choices=("pt", "npy"), default="pt", help="pt: extract.py's files; npy: arrays")
    parser.add_argument("--fp16", action="store_true", help="store representations as float16 (half the disk)")
    return parser


def normalize_layers(layers: list[int], num_layers: int) -> list[int]:
    """extract.py's layer numbering: -1 is num_layers, 0 the embeddings output; anything else is an error."""
    bad = [i for i in layers if not -(num_layers + 1) <= i <= num_layers]
    if bad:
        raise ConfigError(
            f"--repr_layers {' '.join(map(str, bad))}: this model has layers 0..{num_layers} "
            f"(or -1..-{num_layers + 1} from the end)"
        )
    return sorted({(i + num_layers + 1) % (num_layers + 1) for i in layers})


def scan_fasta(path: Path, truncation: int) -> list[Record]:
    """Every record's id, label and (truncated) length; duplicate ids and an empty file are errors."""
    records, seen = [], {}
    for index, (record_id, header, residues) in enumerate(read_records(path)):
        if record_id in seen:
            raise DataError(
                f"{path}: record id {record_id!r} appears twice (records {seen[record_id] + 1} and {index + 1}); "
                "output files are named by id, so give every record a unique first word in its header"
            )
        if not residues:
            raise DataError(f"{path}: record {record_id!r} holds no residues; remove it or add its sequence")
        seen[record_id] = index
        records.append(Record(index, record_id, header, min(len(residues), truncation), len(residues) > truncation))
    return records


def read_chunks(path: Path, truncation: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """(record index, token ids with <cls>/<eos>) in chunks of CHUNK_RECORDS, truncated as extract.py does."""
    chunk = []
    for index, (_, _, residues) in enumerate(read_records(path)):
        ids = encode_residues(residues[:truncation]).astype(np.int64)
        chunk.append((index, np.concatenate([[CLS_ID], ids, [EOS_ID]])))
        if len(chunk) == CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def token_batches(chunk: list[tuple[int, np.ndarray]], toks_per_batch: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Length-sorted batches whose padded size stays within toks_per_batch (one sequence at least)."""
    batch, longest = [], 0
    for item in sorted(chunk, key=lambda item: len(item[1])):
        longest_with = max(longest, len(item[1]))
        if batch and longest_with * (len(batch) + 1) > toks_per_batch:
            yield batch
            batch, longest_with = [], len(item[1])
        batch.append(item)
        longest = longest_with
    if batch:
        yield batch


def pad(batch: list[tuple[int, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for _, ids in batch)
    tokens = torch.full((len(batch), longest), PAD_ID, dtype=torch.long)
    for row, (_, ids) in enumerate(batch):
        tokens[row, : len(ids)] = torch.from_numpy(ids)
    return tokens, tokens.ne(PAD_ID).long()


@torch.no_grad()
def forward(loaded: LoadedModel, tokens: torch.Tensor, mask: torch.Tensor, layers: list[int], contacts: bool):
    """{layer: (B, T, H) fp32 on the CPU} and, when asked, (B, T-2, T-2) contacts, as fair-esm's ESM2 returns."""
    model = loaded.model
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        out = model.esm(input_ids=tokens, attention_mask=mask, output_hidden_states=True, output_attentions=contacts)
    # hidden_states[0] is the embeddings output (after token dropout's rescale, pads zeroed): fair-esm's layer 0;
    # the last is after emb_layer_norm_after, as fair-esm's layer num_layers.
    representations = {layer: out.hidden_states[layer].float().cpu() for layer in layers}
    result = None
    if contacts:
        attentions = torch.stack(out.attentions, dim=1).float()  # B x layers x heads x T x T
        pair = (mask.unsqueeze(1) * mask.unsqueeze(2)).to(attentions)  # fair-esm zeroes the pads' attention
        attentions = attentions * pair[:, None, None]
        result = model.esm.contact_head(tokens, attentions).float().cpu()
    return representations, result


def prepare(args: argparse.Namespace) -> tuple[LoadedModel, list[Record], list[int]]:
    """Check every input before anything is written: a refused run leaves nothing behind."""
    if args.toks_per_batch < 1 or args.truncation_seq_length < 1:
        raise ConfigError("--toks_per_batch and --truncation_seq_length must be positive")
    if not Path(args.fasta_file).is_file():
        raise DataError(f"{args.fasta_file} does not exist; pass the FASTA file of the sequences to embed")
    contacts = "contacts" in args.include
    loaded = load_model(args.model_location, attn_implementation="eager" if contacts else "sdpa")
    if contacts and not loaded.contact_head_trained:
        raise ConfigError(
            f"--include contacts: the contact head of {loaded.description} was never trained (masked-LM pretraining "
            "leaves it frozen at its initialisation); drop 'contacts', or use a model started from ESM-2 weights"
        )
    if loaded.max_tokens and args.truncation_seq_length + 2 > loaded.max_tokens:
        raise ConfigError(
            f"--truncation_seq_length {args.truncation_seq_length}: {loaded.description} has learned positions for "
            f"{loaded.max_tokens} tokens, <cls> and <eos> included; pass {loaded.max_tokens - 2} or less"
        )
    layers = normalize_layers(args.repr_layers, loaded.num_layers)
    records = scan_fasta(args.fasta_file, args.truncation_seq_length)
    if not records:
        raise DataError(f"{args.fasta_file} holds no sequences; pass a FASTA with at least one record")
    return loaded, records, layers


def run(args: argparse.Namespace) -> int:
    """Extract; returns the number of records written (records a previous run wrote are skipped)."""
    loaded, records, layers = prepare(args)
    out: Path = args.output_dir
    manifest = {
        "model": str(loaded.source.resolve()),  # as the FASTA: a rerun may name the model by another path
        "fasta": str(Path(args.fasta_file).resolve()),
        "records": len(records),
        "repr_layers": layers,
        "include": sorted(args.include),
        "truncation_seq_length": args.truncation_seq_length,
        "format": args.format,
        "fp16": args.fp16,
    }
    check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    if args.format == "npy":
        writer = NpyWriter(out, records, args.include, layers, args.fp16, loaded.model.config.hidden_size)
    else:
        writer = PtWriter(out, records, args.include, args.fp16)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    todo = sum(not writer.done(r) for r in records)
    print(f"Read {args.fasta_file} with {len(records)} sequences; {len(records) - todo} already in {out}", flush=True)
    longer = sum(r.cut and not writer.done(r) for r in records)  # only those this run writes: no repeat on rerun
    if longer:  # extract.py cuts silently; a user should know their embeddings miss residues
        log.warning(
            "%d sequences are longer than --truncation_seq_length=%d residues and were cut to their first %d",
            longer,
            args.truncation_seq_length,
            args.truncation_seq_length,
        )
    loaded.model.to(device_for(args.nogpu))
    written = 0
    with progress_bar() as progress:
        task = progress.add_task("Embedding", total=todo)
        for chunk in read_chunks(args.fasta_file, args.truncation_seq_length):
            chunk = [item for item in chunk if not writer.done(records[item[0]])]
            for batch in token_batches(chunk, args.toks_per_batch):
                tokens, mask = pad(batch)
                reps, contacts = forward(loaded, tokens, mask, layers, "contacts" in args.include)
                for row, (index, _) in enumerate(batch):
                    writer.write(
                        records[index],
                        {layer: t[row] for layer, t in reps.items()},
                        None if contacts is None else contacts[row],
                    )
                written += len(batch)
                progress.advance(task, len(batch))
            writer.flush()
    print(f"Wrote {written} records to {out} ({args.format})", flush=True)
    return written
