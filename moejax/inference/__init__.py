"""Inference: KV-cache decoding and sampling (one forward pass with the model) and the decode bandwidth cost model."""
