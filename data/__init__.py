"""trident.data: tokenizers, Megatron-compatible indexed datasets, packing, blending, loading.

One job per module; import what you use (nothing here imports torch except ``loader``):

- ``tokenizer``   ``load_tokenizer(path)`` (sentencepiece ``.model`` or HF ``tokenizer.json``),
                  ``train_sentencepiece(...)``
- ``sources``     finding and reading JSONL / text / .gz inputs
- ``corpus``      the default corpus: this interpreter's stdlib sources as JSONL
- ``indexed``     ``IndexedDataset`` (reader), ``IndexedDatasetWriter``, ``merge_datasets``
- ``preprocess``  ``preprocess(...)``: corpus files -> ``PREFIX.bin`` / ``PREFIX.idx``
- ``cache``       validated, atomically written index caches
- ``gpt_dataset`` ``GPTDataset``: packed ``seq_len + 1`` samples with ``doc_ids`` and ``loss_mask``
- ``blend``       splits, weighted blends, ``build_gpt_datasets(...)`` for train/valid/test
- ``loader``      ``DataLoader``: each dp rank's microbatches, resumable from consumed samples

Only ``trident.errors`` is imported from the rest of the package: the loader and datasets
take plain ``dp_rank`` / ``dp_size`` ints and an optional barrier, so they do not depend
on ``trident.parallel``.
"""
