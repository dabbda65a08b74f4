"""Tokens for training and sampling: `tokenizer` (the Tokenizer interface, SentencePiece, R1's
chat template, `load_tokenizer`), `hf_tokenizer` (`tokenizer.json` and its jinja chat template),
`tasks` (the built-in verifiable tasks and their corpus), `sources` (JSONL / ArrayRecord records,
bad lines reported with file and line), `pipeline` (the grain pipeline: packing, batching) and
`datasets` (what a run config asks for)."""
