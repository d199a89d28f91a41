"""Weight conversion between ditjax checkpoints and other frameworks' files.

pytorch_dit: the DiT/SiT state-dict key map (NumPy only); torch_zip and files: .pt / .safetensors
readers and writers that never execute pickled code; pytorch: file ↔ checkpoint directory, used by
the ``python -m ditjax.convert`` CLI.
"""
