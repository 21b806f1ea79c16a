"""Finding 20 of docs/retrieval_study.md: the trainer with its loss on the MQAR answers only.

An experiment record, not a tool (no tests; run it from the repository root with the package
installed). It runs ``python -m megatron_rwkvx.pretrain`` with the given arguments, after changing
megatron-core's ``GPTDataset`` samples so that ``loss_mask`` keeps only the positions whose input is
a letter (``mqar_one_letter.py --keys 52`` adds the uppercase ones) after ``Recall:`` (in the same document) and whose label is a digit: the asked
values of ``mqar_one_letter.py``'s documents, as the toy's ``--train-loss scored`` (Zoology's MQAR
loss). With ``ANSWER_MARKER=.`` the marker is the ``.`` before the questions of its ``--layout
compact`` and ``compact-apart`` documents. The logged training and validation loss is then the loss on those answers (chance: ln 10 =
2.30). The paper's recipe trains on every token. Since finding 23 the package has
the same loss as an option: ``mqar_one_letter.py make`` writes the answers' spans, ``preprocess_data.py
--loss-spans-key answers`` marks them and ``pretrain --loss-on-spans`` trains on them (the same masks
as this script's on windows that start at a document's start, and right also where a window cuts a
question list, which this script's rule misses); this script stays as the record of findings 20-22.

  python docs/experiments/answer_loss_pretrain.py --device cpu --tokenizer-type ByteTokenizer ... (pretrain's arguments)
"""
import os
import sys

import torch

from megatron_rwkvx.data.tokenizers import ByteTokenizer

RECALL = list(os.environ.get("ANSWER_MARKER", "Recall:").encode())
EOD = ByteTokenizer().eod


def answers_only(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ids = tokens.tolist()
    mask = torch.zeros(len(ids), dtype=torch.float32)
    asking = False
    for j, t in enumerate(ids):
        if t == EOD:
            asking = False
        elif ids[max(0, j - len(RECALL) + 1): j + 1] == RECALL:
            asking = True
        elif asking and chr(t).isascii() and chr(t).isalpha() and ord("0") <= int(labels[j]) <= ord("9"):
            mask[j] = 1.0
    return mask


def main(argv) -> int:
    from megatron.core.datasets.gpt_dataset import GPTDataset

    plain = GPTDataset.__getitem__

    def getitem(self, idx):
        sample = plain(self, idx)
        sample["loss_mask"] = answers_only(sample["tokens"], sample["labels"])
        return sample

    GPTDataset.__getitem__ = getitem
    from megatron_rwkvx.pretrain import main as pretrain

    return pretrain(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
