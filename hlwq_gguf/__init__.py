"""hlwq-gguf: Hadamard-Lloyd weight quantization (HLWQ) for GGUF and llama.cpp."""
__version__ = "0.1.0"
