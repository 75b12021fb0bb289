"""emma-deploy runtime: runs an EMMA bundle on ONNX Runtime or TensorRT. Never imports torch."""
