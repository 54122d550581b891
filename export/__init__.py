"""PyTorch side: the DF5T network, checkpoint loading and ONNX export. Imports torch."""
