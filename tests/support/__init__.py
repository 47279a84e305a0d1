"""Helpers the tests import or run: a tiny CLIP tower and pictures (tiny_clip), tokenizer
folders in Hugging Face's format (hf_tokenizer_files), the stubbed CUDA driver and the GPU
launch-path scenarios run on it (fake_gpu, autotune_scenarios), and the pytest plugin that
runs litgpt's own adapter tests on the fused op (litgpt_fused_plugin)."""
