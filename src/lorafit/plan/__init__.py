"""`lorafit plan`: exact parameter counts and a memory estimate for a run config, without loading weights."""
