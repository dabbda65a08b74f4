"""Weights in and out of r1jax: `hf` (the one Hugging Face name table, `from_transformers`,
`load(path) -> (model, tokenizer)`), `hf_dir` (HF model directories, FP8 included, checked from
their headers and streamed into a sharding), `safetensors_files` (header parsing, one-tensor
reads), `convert` (HF directory -> params export) and `export` (r1jax -> HF directory)."""
