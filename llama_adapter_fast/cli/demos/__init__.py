"""The demos, each runnable on a 2-core CPU in a few minutes on the bundled files:

- `text.py`: `llama-adapter-fast demo` (pretrain a tiny LLaMA, fine-tune its adapter, answer held-out instructions);
- `multimodal.py`: `llama-adapter-fast demo-mm` (the multi-modal adapter on questions about pictures);
- `op.py`: `make demo-op` (the op alone through every backend, against the float64 oracle);
- `shape_pictures.py`: the pictures and questions of the multi-modal demo.
"""
