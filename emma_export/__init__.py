"""emma-deploy, export side: the reference PyTorch EMMA, ONNX export, quantization, engines."""
