"""Data pipeline: tokenizers, input readers, preprocessing to Megatron indexed datasets, training datasets.

Modules: ``tokenizers`` (build_tokenizer), ``rwkv_trie`` (World tokenizer core, optional C walk in
``_rwkv_trie.c``), ``readers``, ``preprocess``, ``indexed`` (file checks), ``datasets`` (GPTDataset
builders, data-parallel batches), ``sample_corpus``. Nothing heavy is imported here.
"""
