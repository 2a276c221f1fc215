"""Fine-tuning CogVLM2: LoRA / QLoRA / full fine-tuning on conversations about images or videos.

Sits on top of the library and imports downward (model, processing, checkpoint); nothing imports it
back. Needs the `finetune` extra (peft, accelerate, tensorboard). Files:

    data.py           datasets on disk (official layout, JSONL manifest), validated up front
    dataset.py        turn sampling and the per-rank, per-epoch data order
    packing.py        labelled examples -> one flat packed batch (no padding)
    objective.py      the loss as one module (what DeepSpeed / FSDP wrap)
    lora.py           peft LoRA: targets, peft-format save/load, unmerged serving, merging
    modules.py        which parameters train (named parts), modules_to_save, per-part learning rates
    quant.py          QLoRA's 4-bit base (bitsandbytes)
    distributed.py    the backend (DDP / ZeRO-2/3 / FSDP2), never a silent fallback; sharded loading
    checkpointing.py  atomic, verified, exactly-resumable checkpoints
    generate_eval.py  generation-based evaluation (greedy answers scored against references)
    train.py          the training loop
    merge.py          merge-lora -> a checkpoint in the official layout
    cli.py            the `finetune` / `merge-lora` sub-commands
"""
