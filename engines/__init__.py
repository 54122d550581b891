"""TensorRT side: engine building and the engine cache."""
