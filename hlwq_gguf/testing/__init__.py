"""Model builders shared by tests/ and scripts/: tiny random checkpoints (a llama, and every seed architecture in
tiny_seeds), code checkpoints in the reference implementation's layout, and the GGUF fuzz seeds. Nothing here is
used by the converter or the runtime."""
