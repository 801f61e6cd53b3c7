"""The `lora` command line: a thin click layer over `advisor` and `flax_lora`."""
