"""zo2-tune's train as a Python function: the same run, resume and checkpoints as the CLI.

    python3 train.py MODEL_DIR TRAIN.jsonl DEV.jsonl OUT_DIR
"""
import sys
import zo2

model_dir, train, dev, out = sys.argv[1:5]
result = zo2.train(model_dir, data=train, eval=dev, eval_every=100, out=out, overwrite=True,
                   steps=300, batch_size=16, lr=1e-3, lr_schedule="linear")   # a tqdm bar if tqdm is installed
print(f"final loss {result.final_loss:.4f}; dev: {result.last_eval}")
