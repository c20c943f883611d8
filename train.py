"""Pretrain an ESM-style protein masked-LM: `python train.py [group=option ...] [key=value ...]`."""

from protein_mlm.cli import train_main

if __name__ == "__main__":
    train_main()
