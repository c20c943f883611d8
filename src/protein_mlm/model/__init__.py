"""The model: ESM build, attention kernels, fast layers, parallelism, memory and FLOP estimates."""
