"""The model: the transformer, its layers, the MoE module and its dispatches; one forward pass for training, scoring, prefill and decode."""
