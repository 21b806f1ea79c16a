"""megatron-rwkvx."""
