"""Inspect the Stage A/B training batches of a config: QA -> chat prompt + answer tokens (loss on the
answer only), question time and context vector attached. The logic lives in `kblampp.data`.

    python train/dataloader.py --config configs/embedded_default.yaml --show 2
"""
from __future__ import annotations

import argparse

from kblampp.config import add_config_args, config_from_args
from kblampp.data import IGNORE_INDEX, QADataset, batch_schedule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--split", choices=("train", "eval"), default="train", help="which QA file of the config")
    parser.add_argument("--show", type=int, default=2, help="rows of the first batch to print decoded")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    import numpy as np

    from kblampp.backbone import load_tokenizer, resolve_backbone_source
    from kblampp.schema import load_qa

    tokenizer = load_tokenizer(resolve_backbone_source(cfg))
    records = load_qa(cfg.train_dataset if args.split == "train" else cfg.eval_dataset)
    ds = QADataset(records, tokenizer, np.zeros((len(records), 1), dtype=np.float32), cfg.max_seq_len)
    prompt = [ex.prompt_len for ex in ds.examples]
    answer = [len(ex.input_ids) - ex.prompt_len for ex in ds.examples]
    print(f"{len(ds)} examples; prompt tokens mean {np.mean(prompt):.1f} max {max(prompt)}; "
          f"answer tokens mean {np.mean(answer):.1f} max {max(answer)}")
    batch = ds.batch(batch_schedule(len(ds), max(1, cfg.batch_size), 0, cfg.seed))
    for key, value in batch.items():
        print(f"  {key}: {tuple(value.shape)} {value.dtype}")
    for b in range(min(args.show, batch["input_ids"].shape[0])):
        n = int(batch["attention_mask"][b].sum())
        labels = [t for t in batch["labels"][b, :n].tolist() if t != IGNORE_INDEX]
        print(f"--- row {b} (tau {batch['tau'][b].tolist()})\n{tokenizer.decode(batch['input_ids'][b, :n])!r}\n"
              f"    loss on: {tokenizer.decode(labels)!r}")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
