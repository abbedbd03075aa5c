"""FALQON in JAX: LoRA adapters melded into an FP8 backbone, one FP8 GEMM per layer."""
