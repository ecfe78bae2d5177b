"""Build the tiny Qwen2-style tokenizer that `model=tiny_qwen2` uses (tests, no hub).

    python data/tiny_qwen2_tokenizer/make.py

A byte-level BPE (like Qwen's) with 2,048 tokens, trained on the shipped sample ledger's text
columns. Like Qwen's tokenizer it has an eos token and NO pad token: lorasweep must set one.
"""

from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
EOS = "<|endoftext|>"


def main() -> None:
    frame = pd.read_parquet(HERE.parent / "sample_ledger" / "ledger.parquet")
    corpus = [", ".join(f"{c}: {v}" for c, v in row.items())
              for row in frame.astype(str).to_dict("records")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, model_max_length=512)
    fast.save_pretrained(HERE)
    print(f"saved to {HERE}: {len(fast)} tokens, pad_token={fast.pad_token}")


if __name__ == "__main__":
    main()
