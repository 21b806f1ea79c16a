"""Training on marked spans only: megatron-core's ``GPTDataset`` with the dataset's loss mask.

``preprocess_data.py --loss-spans-key`` writes, beside a dataset, one 0/1 mark per token
(``indexed.loss_mask_prefix``): 1 for the tokens a model is trained to predict (the answers of an
SFT or retrieval corpus). ``pretrain --loss-on-spans`` builds its datasets from this class, whose
samples keep the loss only where the predicted token is marked.
"""
from __future__ import annotations

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_rwkvx.data.indexed import loss_mask_prefix


class SpanLossGPTDataset(GPTDataset):
    """The marks are read through ``GPTDataset``'s own walk from a sample to its document pieces
    (``_query_document_sample_shuffle_indices``, with the mask file in place of the tokens), so
    they cannot fall out of step with the tokens however megatron-core cuts and shuffles samples.
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.marks = IndexedDataset(loss_mask_prefix(dataset_path), multimodal=False, mmap=config.mmap_bin_files)

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        if idx is None:
            return sample  # batch padding: megatron-core already masks all of it
        tokens, self.dataset = self.dataset, self.marks
        try:
            marks, _ = self._query_document_sample_shuffle_indices(idx)
        finally:
            self.dataset = tokens
        # marks[j] belongs to token j, and loss_mask[j] scores the prediction of token j + 1.
        # Padding reads as megatron-core's pad id (-1), never a mark.
        targets = marks[1:] if self.config.add_extra_token_to_sequence else numpy.append(marks[1:], 0)
        sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy(targets > 0).to(sample["loss_mask"].dtype)
        return sample
