"""μP learning-rate transfer on the bundled digits: final loss vs log2 lr at widths 32…256, SP vs μP.

Widths grow by adding heads at head dim 16 (as DiT-μP does at 72); the base width is the smallest,
so μP and SP use the same learning rates there and differ only by init. Small enough for a 2-core CPU
(72 runs, see docs/mup.md):

    python launch/sweep.py --config configs/mup_transfer.py --backend local --parallel 2 --sweep-dir DIR
    python launch/sweep.py report --sweep-dir DIR --x optim.lr --group model.hidden_size \
        --panel mup.parametrization --metric final_loss

One run: python -m ditjax.train --config configs/mup_transfer.py --workdir DIR \
    --config.model.hidden_size=128 --config.model.num_heads=8 --config.mup.parametrization=mup
"""
from configs.default import get_config as default_config
from ditjax import sweep as hyper

HEAD_DIM = 16
WIDTHS = (32, 64, 128, 256)
LOG2_LRS = (-11, -3)  # inclusive: 9 points


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.update(depth=2, hidden_size=WIDTHS[0], num_heads=WIDTHS[0] // HEAD_DIM)
    c.mup.update(base_hidden_size=WIDTHS[0], base_num_heads=WIDTHS[0] // HEAD_DIM, output_mult=1.0)
    # DiT-μP's loop (constant-ish Adam, no clipping, no weight decay) with a short warm-up and cosine
    # decay, so the last logged losses reflect the lr rather than its noise.
    c.optim.update(lr=2**-8, b2=0.99, schedule="warmup_cosine", warmup_steps=24, end_lr=0.0, grad_clip=0.0,
                   weight_decay=0.0)
    c.train.update(global_batch_size=16, num_steps=240, log_every=4, checkpoint_every=240, keep_last=1,
                   async_checkpoint=False, eval_at_end=False)
    c.sample.update(steps=2, grid_classes=2, grid_per_class=2, batch_size=4)
    return c


def get_sweep(arg=None):
    del arg
    return hyper.product(
        hyper.sweep("mup.parametrization", ["sp", "mup"]),
        hyper.zipit(hyper.sweep("model.hidden_size", list(WIDTHS)),
                    hyper.sweep("model.num_heads", [w // HEAD_DIM for w in WIDTHS])),
        hyper.sweep("optim.lr", hyper.log2_range(*LOG2_LRS)),
    )
