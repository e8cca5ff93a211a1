"""What is checked and reported about a written merge, from the written files only: the smoke test
(tensors, loading, generation, bits per byte), the model card, the routing report and its plots, and
`zenith-merge chat`."""
