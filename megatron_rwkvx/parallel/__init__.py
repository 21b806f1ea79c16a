"""Process-group set-up and the parallel pieces specific to RWKV-X."""
