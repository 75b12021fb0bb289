"""Peers that `emma-bench` times this runtime against (a Qwen3 folder of the Und branch, ONNX Runtime
GenAI), and the memory-bandwidth floor both are judged by."""
