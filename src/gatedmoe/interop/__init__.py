"""Interop with other libraries: `gatedmoe.interop.hf` converts the MoE blocks of Hugging
Face transformers models to gatedmoe and back (``pip install gatedmoe[hf]``)."""
