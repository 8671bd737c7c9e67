"""Privacy of the updates: clipping, noise and accounting for central DP (and the
maths of secure aggregation). Pure: tensors and numbers in, tensors and numbers out."""
