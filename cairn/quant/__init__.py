"""Number formats: tensors made smaller for the wire, for DiLoCo's deltas and (coming) for quantized weights."""
